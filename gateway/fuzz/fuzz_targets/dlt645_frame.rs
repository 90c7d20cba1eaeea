//! Any bytes a DL/T 645 meter (or the line) sends back: preamble, noise
//! before 0x68, broken checksums and lengths, other meters' frames. The
//! frame finder must return a frame only where the bytes hold one exactly
//! (re-encoding it gives the same bytes), an answer's data must be what is
//! left after the echoed DI, and every answer must decode as every format
//! without panicking. One input in sixteen also goes through a whole
//! exchange (request written, answer read with a timeout).
#![no_main]

use guantong_gateway::dlt645::di::{Format, Reading};
use guantong_gateway::dlt645::frame::{self, Address, Found, Reply};
use guantong_gateway::dlt645::transport::read_with_reply;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&[mode], bytes)) = data.split_first_chunk::<1>() else {
        return;
    };
    if let Found::Frame(f, end) = frame::find_frame(bytes) {
        assert!(end <= bytes.len());
        let encoded = frame::request(f.address, f.control, &f.data);
        // Without the preamble, the frame is exactly the bytes it ends.
        let body = &encoded[frame::PREAMBLE.len()..];
        assert_eq!(&bytes[end - body.len()..end], body);
        let meter = Address([1, 0, 0, 0, 0, 0]);
        let di = 0x0201_0100;
        for (to, control, asked) in [
            (meter, frame::READ_DATA, Some(di)),
            (frame::BROADCAST, frame::READ_ADDRESS, None),
        ] {
            match frame::reply(&f, to, control, asked) {
                Reply::Data(d) => {
                    let echo = if asked.is_some() { 4 } else { 0 };
                    assert_eq!(d.len() + echo, f.data.len());
                    for format in [Format::Number, Format::Date, Format::Time, Format::Digits] {
                        let r = Reading {
                            length: (mode % 9).max(1),
                            format,
                            signed: mode & 0x80 != 0,
                            scale: 0.01,
                        };
                        let _ = r.decode(&d);
                    }
                }
                Reply::Error(_) => assert!(f.control & 0x40 != 0),
                Reply::Mismatch | Reply::Other => {}
            }
        }
    }
    if mode & 0x0F == 0 {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a runtime");
        let _ = runtime.block_on(read_with_reply(Some(bytes.to_vec())));
    }
});
