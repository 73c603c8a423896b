//! Postgres backend: being written (issue 4).
