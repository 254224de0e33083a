//! Checks the task binaries share before any work: an output file whose directory does not exist
//! is refused with one wording, naming the flag.
use std::path::Path;

use crate::error::{Error, Result};

/// Refuses the output file `path` of `flag` (e.g. `--output`) when its directory does not exist.
pub fn check_output_parent(flag: &'static str, path: &Path) -> Result<()> {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) if !dir.is_dir() => Err(Error::OutputDir { flag, path: path.to_path_buf(), dir: dir.to_path_buf() }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_the_flag_the_file_and_the_directory() {
        let err = super::check_output_parent("--output", std::path::Path::new("/no/such/dir/out.json")).unwrap_err().to_string();
        assert_eq!(err, "--output /no/such/dir/out.json: directory /no/such/dir does not exist");
        super::check_output_parent("--output", std::path::Path::new("out.json")).unwrap();
    }
}
