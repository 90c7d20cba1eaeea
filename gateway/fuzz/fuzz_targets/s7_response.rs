//! Any bytes an S7 PLC sends back (a TPKT frame's header and payload, to a
//! connection request, setup communication, a read of several items or a
//! read of the system status list) must decode or fail with an error — never
//! a panic — and a read answer that decodes has exactly the items asked,
//! each decodable as every type, timers and counters included.
#![no_main]

use guantong_gateway::s7::config::{Address, S7TagConfig, S7Type};
use guantong_gateway::s7::{decode, proto};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&[items, bit], payload)) = data.split_first_chunk::<2>() else {
        return;
    };
    if let Some(header) = payload.first_chunk::<4>() {
        let _ = proto::tpkt_payload_len(*header);
    }
    let _ = proto::check_connect_confirm(payload);
    let _ = proto::setup_response(payload);
    if let Ok(part) = proto::szl_response(payload) {
        for len in [28, 34] {
            for (_, record) in proto::szl_records(&part.data, len) {
                let _ = proto::szl_text(record);
            }
        }
    }
    let expected = usize::from(items % 21);
    let Ok(answers) = proto::read_response(payload, expected) else {
        return;
    };
    assert_eq!(answers.len(), expected);
    let bit_address = format!("DB1.DBX0.{}", bit % 8);
    for bytes in answers.into_iter().flatten() {
        for (address, data_type) in [
            (bit_address.as_str(), S7Type::Bool),
            ("DB1.DBB0", S7Type::U8),
            ("DB1.DBB0", S7Type::I8),
            ("DB1.DBB0", S7Type::String),
            ("DB1.DBW0", S7Type::U16),
            ("DB1.DBW0", S7Type::I16),
            ("DB1.DBD0", S7Type::U32),
            ("DB1.DBD0", S7Type::I32),
            ("DB1.DBD0", S7Type::F32),
            ("DB1.DBD0", S7Type::F64),
            ("DB1.DBW0", S7Type::Date),
            ("DB1.DBD0", S7Type::Time),
            ("DB1.DBD0", S7Type::TimeOfDay),
            ("DB1.DBB0", S7Type::DateAndTime),
            ("DB1.DBB0", S7Type::Dtl),
            ("T1", S7Type::F64),
            ("C1", S7Type::U16),
        ] {
            let tag = S7TagConfig {
                name: "t".into(),
                address: address.into(),
                data_type,
                length: Some(254),
                unit: String::new(),
                parsed: Address::parse(address).ok(),
            };
            let _ = decode(&tag, &bytes);
        }
    }
});
