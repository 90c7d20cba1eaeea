//! Sparkplug B primary host application: the STATE messages.
//!
//! With `primary_host_id` set on a Sparkplug device, that device's MQTT
//! session announces the gateway as the primary host application, so edge
//! nodes configured to wait for it publish (and hold their data while it is
//! away, to send it as historical data on its return).
//!
//! Rules (Sparkplug 3.0, host application STATE):
//! - Topic `spBv1.0/STATE/<host id>`, QoS 1, retained; payload JSON
//!   `{"online":<bool>,"timestamp":<ms>}`.
//! - Every CONNECT carries the offline message as its will, with a timestamp
//!   taken just before that connect attempt (`Announcer::next_connect`).
//! - After connecting: subscribe to the own STATE topic with the data
//!   filters, then publish online with the same timestamp as the will.
//! - A delivered STATE on the own topic saying offline (a late will of an
//!   earlier session, another client) is answered at once by publishing
//!   online again with the current connect's timestamp.
//! - A deliberate stop publishes offline (same timestamp) before
//!   disconnecting.
//! - A host application connects with a clean session: what it missed is the
//!   edge nodes' to hold, not the broker's (they see the host offline).

use serde::Deserialize;

use super::config::MqttConfig;
use crate::quality::now_ms;

/// The STATE topic of host `id`.
pub fn topic(id: &str) -> String {
    format!("spBv1.0/STATE/{id}")
}

/// A STATE payload.
pub fn payload(online: bool, timestamp: i64) -> Vec<u8> {
    format!(r#"{{"online":{online},"timestamp":{timestamp}}}"#).into_bytes()
}

#[derive(Deserialize)]
struct State {
    online: bool,
}

/// Whether `payload` is a STATE message saying the host is offline; a
/// payload that is not a STATE message counts as not offline.
pub fn says_offline(payload: &[u8]) -> bool {
    serde_json::from_slice::<State>(payload).is_ok_and(|s| !s.online)
}

/// The STATE of one primary host, for one MQTT session.
#[derive(Debug, Clone)]
pub struct Announcer {
    pub topic: String,
    /// The timestamp of the current connect attempt's will.
    timestamp: i64,
}

impl Announcer {
    /// `None` unless `config` makes this device the primary host.
    pub fn for_device(config: &MqttConfig) -> Option<Announcer> {
        config.primary_host_id.as_deref().map(|id| Announcer {
            topic: topic(id),
            timestamp: now_ms(),
        })
    }

    /// Takes a new timestamp for the next connect attempt; returns the will.
    pub fn next_connect(&mut self) -> Vec<u8> {
        // Strictly later than the last one, even within one millisecond.
        self.timestamp = now_ms().max(self.timestamp + 1);
        self.offline()
    }

    pub fn online(&self) -> Vec<u8> {
        payload(true, self.timestamp)
    }

    pub fn offline(&self) -> Vec<u8> {
        payload(false, self.timestamp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_the_specifications_json() {
        assert_eq!(
            payload(true, 1_764_057_600_125),
            br#"{"online":true,"timestamp":1764057600125}"#
        );
        assert!(says_offline(br#"{"online":false,"timestamp":5}"#));
        assert!(says_offline(br#"{ "timestamp": 5, "online": false }"#));
        assert!(!says_offline(br#"{"online":true,"timestamp":5}"#));
        assert!(!says_offline(b"OFFLINE"));
        assert!(!says_offline(b""));
    }

    #[test]
    fn each_connect_gets_a_later_timestamp_shared_by_will_and_birth() {
        let mut a = Announcer {
            topic: topic("h"),
            timestamp: i64::MAX - 10,
        };
        let will = a.next_connect();
        assert_eq!(will, payload(false, i64::MAX - 9));
        assert_eq!(a.online(), payload(true, i64::MAX - 9));
        a.next_connect();
        assert_eq!(a.offline(), payload(false, i64::MAX - 8));
        assert_eq!(a.topic, "spBv1.0/STATE/h");
    }
}
