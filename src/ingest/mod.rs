//! The ingest pipeline: accepted events wait in a bounded buffer, the flusher inserts them into
//! ClickHouse in batches, and batches ClickHouse cannot take become dead letters on disk.

pub mod buffer;
pub mod dead_letter;
pub mod flusher;

pub use self::{
    buffer::{Batch, Buffer, Limits, PushError},
    dead_letter::DeadLetters,
    flusher::Flusher,
};
