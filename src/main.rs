//! The `ragtune` command-line tool.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    // candle attaches a captured backtrace to its errors when RUST_BACKTRACE is set, and it
    // would end up inside user-facing messages; RAGTUNE_BACKTRACE=1 keeps it for debugging.
    if std::env::var_os("RAGTUNE_BACKTRACE").is_none() {
        // Called first, before any thread is started (set_var/remove_var are not thread-safe).
        std::env::remove_var("RUST_BACKTRACE");
        std::env::remove_var("RUST_LIB_BACKTRACE");
    }
    // Forward passes reuse freed memory instead of faulting it in again (glibc only).
    ragtune_util::alloc::keep_freed_memory();
    match cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if cli::is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
