//! The gateway's signing identity: an Ed25519 key created at first start and
//! kept in one file, readable by its owner only (format and tests in
//! `guantong_proto::keyfile`, shared with ingest's digest key). The public
//! key's fingerprint (`guantong-gateway identity`) is what an installer
//! registers with ingest.

pub use guantong_proto::keyfile::{KeyFileError as IdentityError, load_or_create};
