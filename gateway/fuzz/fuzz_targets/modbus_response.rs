//! Any bytes a Modbus device sends back (RTU or TCP framing, to a register
//! read or an identification request) must yield an outcome — never a
//! panic, never values shifted into the wrong tags — and every register a
//! read returns must decode as every type and order without panicking.
#![no_main]

use guantong_gateway::modbus::config::{ModbusTagConfig, ModbusType, Table, WordOrder};
use guantong_gateway::modbus::decode::decode_tag;
use guantong_gateway::modbus::transport::{Outcome, read_with_reply};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&[mode, count], reply)) = data.split_first_chunk::<2>() else {
        return;
    };
    let rtu = mode & 1 == 0;
    let count = u16::from(count) % 126;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    let outcome = runtime.block_on(read_with_reply(Some(reply.to_vec()), rtu, count));
    if let Outcome::Words(words) = outcome {
        assert_eq!(words.len(), usize::from(count));
        for ty in [
            ModbusType::U16,
            ModbusType::I16,
            ModbusType::U32,
            ModbusType::I32,
            ModbusType::U64,
            ModbusType::I64,
            ModbusType::F32,
            ModbusType::F64,
            ModbusType::String,
            ModbusType::Bool,
        ] {
            for order in WordOrder::ALL {
                let mut tag = ModbusTagConfig::new("t", Table::Holding, 0, ty);
                tag.order = order;
                tag.bit = (ty == ModbusType::Bool).then_some(mode % 16);
                tag.length = words.len().max(1) as u16;
                tag.min = Some(-1.0);
                let n = usize::from(tag.words()).min(words.len());
                let _ = decode_tag(&tag, &words[..n]);
            }
        }
    }
});
