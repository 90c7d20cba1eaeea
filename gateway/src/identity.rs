//! The gateway's signing identity: a key created at first start and kept in
//! one file, readable by its owner only (format and tests in
//! `guantong_proto::keyfile`, shared with ingest's digest key). Its algorithm
//! is `[gateway] key_algorithm`: Ed25519 by default, or SM2 with SM3. The
//! public key's fingerprint (`guantong-gateway identity`), which names the
//! algorithm, is what an installer registers with ingest.

pub use guantong_proto::keyfile::{
    KeyFileError as IdentityError, load_or_create_chain_key as load_or_create,
};
