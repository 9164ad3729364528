//! How the examples end on an error: `fn main() -> Result<(), MainError>` prints
//! `Error: ` and the error with each of its causes once ([`hypervisor::cli::error_chain`]),
//! instead of anyhow's report, which repeats every cause that a message already names (an OS
//! error came out three times).

use std::fmt;

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

#[cfg(test)]
mod tests {
    use super::*;
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
