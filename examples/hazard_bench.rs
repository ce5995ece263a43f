//! Measures hazard-archive encryption of one file: `hazard_bench KEY ARCHIVE_DIR FILE`.
//! Run under `/usr/bin/time -v` for the peak RSS (README, "Hazard archive").

use std::time::Instant;

use shuttle::hazard::{EntryMeta, HazardArchive};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, key, dir, file] = &args[..] else {
        return Err("usage: hazard_bench KEY ARCHIVE_DIR FILE".into());
    };
    let archive = HazardArchive::new(dir.as_ref(), key.as_ref())?;
    let mut buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    let (sha256, size) = shuttle::fsx::hash_file(&mut std::fs::File::open(file)?, &mut buf, None)?;
    let hashed = t.elapsed().as_secs_f64();
    let meta = EntryMeta {
        file_id: 1,
        original_path: file.clone(),
        size,
        sha256,
        detections: vec!["bench".into()],
        scanners: Vec::new(),
        withdrawn_from: None,
    };
    let t = Instant::now();
    let stored = archive.store(&mut std::fs::File::open(file)?, &meta)?;
    let secs = t.elapsed().as_secs_f64();
    let mib = size as f64 / 1_048_576.0;
    println!(
        "{}: {mib:.0} MiB encrypted in {secs:.2} s = {:.0} MiB/s (sha256 pass alone {:.0} MiB/s) -> {}",
        archive.recipient().algorithm,
        mib / secs,
        mib / hashed,
        stored.archive.display()
    );
    Ok(())
}
