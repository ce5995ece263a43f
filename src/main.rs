//! The `shuttle` command. Everything lives in the library; see `shuttle::cli`.

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(shuttle::cli::main())
}
