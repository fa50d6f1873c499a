//! [`Cause`]: the failure underneath one of our errors, kept as its `source()` rather than
//! flattened into a `reason: String`. Our error enums stay `Clone + PartialEq + Eq` (tests
//! compare them; the KMS client retries by cloning), which a bare `Box<dyn Error>` would not
//! allow; like rustls' `OtherError`, the cause is shared behind an `Arc`.
//!
//! Display convention: our error messages include their cause's text (users read one line,
//! see `main.rs`); the cause is also the `source()`, so code can walk the chain and
//! [`Cause::find`] an `io::Error` or an SDK error in it.

use std::error::Error;
use std::fmt;
use std::sync::Arc;

/// An underlying failure: an error value, an error with what was being done, or (where no
/// error value exists, e.g. a check that failed) a description.
#[derive(Clone)]
pub struct Cause(Arc<dyn Error + Send + Sync + 'static>);

impl Cause {
    /// The error itself.
    pub fn new<E: Error + Send + Sync + 'static>(e: E) -> Self {
        Cause(Arc::new(e))
    }

    /// A failure that has no error value, only a description.
    pub fn msg(text: impl Into<String>) -> Self {
        Cause(Arc::new(Message(text.into())))
    }

    /// `error`, with what was being done when it happened ("cannot read /x"). Displays as
    /// `what: error: error's source: …`; `source()` is `error`.
    pub fn context<E: Error + Send + Sync + 'static>(what: impl Into<String>, error: E) -> Self {
        Cause(Arc::new(Context {
            what: what.into(),
            error: Box::new(error),
        }))
    }

    /// The first error of type `T` in this cause's chain.
    pub fn find<T: Error + 'static>(&self) -> Option<&T> {
        let mut next: Option<&(dyn Error + 'static)> = Some(&*self.0);
        while let Some(e) = next {
            if let Some(t) = e.downcast_ref::<T>() {
                return Some(t);
            }
            next = e.source();
        }
        None
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

impl fmt::Debug for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl Error for Cause {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.0.source()
    }
}

/// Two causes are equal when they are the same shared error or read the same.
impl PartialEq for Cause {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.to_string() == other.to_string()
    }
}

impl Eq for Cause {}

/// A failure known only by its description.
#[derive(Debug)]
struct Message(String);

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Error for Message {}

/// An error with what was being done.
#[derive(Debug)]
struct Context {
    what: String,
    error: Box<dyn Error + Send + Sync + 'static>,
}

impl fmt::Display for Context {
    /// The whole chain: some errors (the AWS SDK's) say little at the top ("dispatch failure")
    /// and the useful part ("connection refused") further down.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.what, self.error)?;
        let mut next = self.error.source();
        let mut last = self.error.to_string();
        while let Some(e) = next {
            let text = e.to_string();
            // Many errors repeat their source's text in their own: say it once.
            if !last.contains(&text) {
                write!(f, ": {text}")?;
            }
            last = text;
            next = e.source();
        }
        Ok(())
    }
}

impl Error for Context {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&*self.error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn context_displays_the_chain_and_keeps_the_source() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let c = Cause::context("cannot reach the KMS", Outer(io));
        assert_eq!(c.to_string(), "cannot reach the KMS: outer: refused");
        assert_eq!(
            c.find::<std::io::Error>().map(std::io::Error::kind),
            Some(std::io::ErrorKind::ConnectionRefused)
        );
        assert!(c.find::<std::fmt::Error>().is_none());
    }

    #[test]
    fn causes_compare_by_identity_or_text_and_clone_shares() {
        let a = Cause::new(std::io::Error::other("disk on fire"));
        assert_eq!(a, a.clone());
        assert_eq!(a, Cause::msg("disk on fire"));
        assert_ne!(a, Cause::msg("disk is fine"));
        assert!(Cause::msg("x").source().is_none());
    }
}
