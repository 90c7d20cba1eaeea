//! The gRPC contract between Guantong gateways and ingest (package `guantong.v1`).
//!
//! The `.proto` file under `proto/` is the source of truth and documents the
//! wire rules; this crate only compiles it.
#![allow(clippy::all)]

pub mod v1 {
    tonic::include_proto!("guantong.v1");
}

pub mod chain;
pub mod keyfile;
pub mod merkle;
