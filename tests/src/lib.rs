//! End-to-end harness: a simulated Modbus device, the real binaries as
//! processes, a fault proxy, and the checker that compares what a device
//! served with what ingest stored. Used by the scenarios in `tests/`, the demo
//! (`guantong-demo`) and the benchmarks.

pub mod bench;
pub mod browser;
pub mod city;
pub mod evidence;
pub mod load;
pub mod mount;
pub mod mqtt;
pub mod opcua;
pub mod pg;
pub mod pipeline;
pub mod procs;
pub mod proxy;
pub mod raw;
pub mod s7;
pub mod scenario;
pub mod sim;
