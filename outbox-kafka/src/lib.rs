//! Placeholder: implemented in the publishers issue.
#![forbid(unsafe_code)]
