pub mod config;
pub mod schedule;
pub mod state;
pub mod engine;
