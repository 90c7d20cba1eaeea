//! `guantong-gateway probe opcua`.
