//! The policy snapshot the filter pulls (DESIGN §8): how it is built from
//! the database, kept current and served on the internal listener.

pub mod build;
pub mod changes;
pub mod publisher;
pub mod serve;
