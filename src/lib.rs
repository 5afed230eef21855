pub mod config;
pub mod schedule;
