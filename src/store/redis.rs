//! Redis backend: being written (issue 3).
