//! How the examples end on an error: `fn main() -> Result<(), MainError>` prints
//! `Error: ` and the error with each of its causes once ([`hypervisor::cli::error_chain`]),
//! instead of anyhow's report, which repeats every cause that a message already names (an OS
//! error came out three times).

use std::fmt;
use std::io::{self, Write};

/// The error of an example's `main`: any error, shown as its deduplicated cause chain.
pub struct MainError(anyhow::Error);

impl<E: Into<anyhow::Error>> From<E> for MainError {
    fn from(error: E) -> Self {
        MainError(error.into())
    }
}

impl fmt::Display for MainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hypervisor::cli::error_chain(&self.0))
    }
}

/// `main` returning `Err` prints this (after `Error: `).
impl fmt::Debug for MainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What an example does after writing a line to stdout.
#[derive(Debug, PartialEq, Eq)]
pub enum Printed {
    /// The line was written (or nobody reads any more and the example should end quietly).
    Written,
    /// The reader closed the pipe (`ivshmem_demo | head -4`): it wants no more output.
    ReaderGone,
}

/// Writes one line of `args` to `out`; a closed pipe is [`Printed::ReaderGone`], any other
/// failure (a full disk) an error.
pub fn write_line(out: &mut impl Write, args: fmt::Arguments<'_>) -> io::Result<Printed> {
    match out.write_fmt(args).and_then(|()| out.write_all(b"\n")) {
        Ok(()) => Ok(Printed::Written),
        Err(error) if error.kind() == io::ErrorKind::BrokenPipe => Ok(Printed::ReaderGone),
        Err(error) => Err(error),
    }
}

/// `println!` for the examples ([`outln!`](crate::outln)): a reader that closed the pipe ends
/// the example quietly with exit 0, as the hypervisor's commands do, and any other write
/// error ends it with the error and exit 1, instead of `println!`'s panic and exit 101.
pub fn print_line(args: fmt::Arguments<'_>) {
    let result = write_line(&mut io::stdout().lock(), args);
    match result {
        Ok(Printed::Written) => {}
        Ok(Printed::ReaderGone) => std::process::exit(0),
        Err(error) => {
            eprintln!("Error: writing to stdout: {error}");
            std::process::exit(1);
        }
    }
}

/// `println!` for the examples: see [`print_line`].
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::main_error::print_line(format_args!($($arg)*))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer whose reader has gone.
    struct ClosedPipe;

    impl Write for ClosedPipe {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from_raw_os_error(32))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_closed_pipe_is_the_reader_gone_and_a_full_disk_an_error() {
        let gone = write_line(&mut ClosedPipe, format_args!("ID = {}", 1)).unwrap();
        assert_eq!(gone, Printed::ReaderGone);
        let mut full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let error = write_line(&mut full, format_args!("x")).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(28), "{error}");
        let mut buffer = Vec::new();
        let written = write_line(&mut buffer, format_args!("ID = {}", 1)).unwrap();
        assert_eq!(
            (written, buffer.as_slice()),
            (Printed::Written, &b"ID = 1\n"[..])
        );
    }
    use anyhow::Context as _;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot connect to the hypervisor at /x.sock: {0}")]
    struct Connect(#[source] std::io::Error);

    #[test]
    fn each_cause_is_printed_once() {
        let os = std::io::Error::from_raw_os_error(2);
        let result: Result<(), Connect> = Err(Connect(os));
        let error: MainError = result.context("attaching as cell `c`").unwrap_err().into();
        let text = format!("{error:?}");
        assert_eq!(
            text,
            "attaching as cell `c`: cannot connect to the hypervisor at /x.sock: \
             No such file or directory (os error 2)"
        );
        assert_eq!(text.matches("os error 2").count(), 1, "{text}");
    }
}
