//! The `shuttle` command. Everything lives in the library; see `shuttle::cli`.

fn main() -> std::process::ExitCode {
    shuttle::cli::main().into()
}
