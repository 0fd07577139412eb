//! Command-line definitions of the two binaries. The binaries parse with
//! them and act; `scripts/deb.sh` makes man pages and completions of them.

pub mod build;
pub mod dynamos;
