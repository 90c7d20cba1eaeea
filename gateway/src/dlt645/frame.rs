//! DL/T 645-2007 frames: building requests, finding and checking answers.
//!
//! A frame is `68 A0..A5 68 C L DATA CS 16`: the address travels least
//! significant byte first, every data byte carries +0x33, and CS is the sum
//! modulo 256 of every byte from the first 0x68 to the last data byte.
//! Requests are sent after the wake-up preamble `FE FE FE FE`.
//!
//! Invariants: `find_frame` takes any bytes (preamble, noise before 0x68,
//! broken or partial frames) and returns only frames whose second 0x68,
//! length, checksum and end byte hold; `reply` accepts a frame as the answer
//! to a request only when its address, control code and (for reads) data
//! identifier match. Nothing here panics, whatever the bytes.

use std::fmt;

/// The wake-up preamble sent before every request.
pub const PREAMBLE: [u8; 4] = [0xFE; 4];
/// Read data (one data identifier).
pub const READ_DATA: u8 = 0x11;
/// Read the communication address (to the broadcast address).
pub const READ_ADDRESS: u8 = 0x13;
/// The address every meter answers a read-address request to.
pub const BROADCAST: Address = Address([0xAA; 6]);
/// Bytes of a frame besides its data: 68, address, 68, C, L, CS, 16.
pub const FRAME_OVERHEAD: usize = 12;
/// Most data bytes a frame carries.
pub const MAX_DATA: usize = 255;

/// A meter address, as on the wire (least significant byte first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address(pub [u8; 6]);

impl Address {
    /// Parses the 12 digits printed on the meter (`"000000000001"`); `A`
    /// stands for the wildcard nibble some installers use (`AAAAAAAAAAAA`).
    pub fn parse(text: &str) -> Result<Address, String> {
        let t = text.trim();
        if t.len() != 12
            || !t
                .chars()
                .all(|c| c.is_ascii_digit() || c == 'A' || c == 'a')
        {
            return Err(format!(
                "`{text}`: expected the meter's 12-digit address as printed on it, e.g. \"000000000001\""
            ));
        }
        let mut wire = [0u8; 6];
        for (i, pair) in t.as_bytes().chunks(2).enumerate() {
            let nibble = |b: u8| match b {
                b'0'..=b'9' => b - b'0',
                _ => 0xA,
            };
            // The last two digits are the least significant byte, sent first.
            wire[5 - i] = nibble(pair[0]) << 4 | nibble(pair[1]);
        }
        Ok(Address(wire))
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0.iter().rev() {
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

/// A data identifier, DI3 DI2 DI1 DI0 as written (`0x02010100`).
pub fn di_bytes(di: u32) -> [u8; 4] {
    di.to_le_bytes()
}

/// A request frame with its preamble; `data` without the 0x33 offset.
pub fn request(address: Address, control: u8, data: &[u8]) -> Vec<u8> {
    let data = &data[..data.len().min(MAX_DATA)];
    let mut f = Vec::with_capacity(PREAMBLE.len() + FRAME_OVERHEAD + data.len());
    f.extend_from_slice(&PREAMBLE);
    f.push(0x68);
    f.extend_from_slice(&address.0);
    f.push(0x68);
    f.push(control);
    f.push(data.len() as u8);
    f.extend(data.iter().map(|b| b.wrapping_add(0x33)));
    let sum = f[PREAMBLE.len()..]
        .iter()
        .fold(0u8, |s, &b| s.wrapping_add(b));
    f.push(sum);
    f.push(0x16);
    f
}

/// A read of one data identifier.
pub fn read_request(address: Address, di: u32) -> Vec<u8> {
    request(address, READ_DATA, &di_bytes(di))
}

/// A checked frame; `data` has the 0x33 offset taken off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub address: Address,
    pub control: u8,
    pub data: Vec<u8>,
}

/// What `find_frame` found in a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// A valid frame ending at byte `end` (exclusive).
    Frame(Frame, usize),
    /// No valid frame yet, but one may be arriving: read more.
    NeedMore,
    /// No valid frame, and none can start in these bytes.
    Nothing,
}

/// The first valid frame in `buf`, skipping the preamble, noise and frames
/// that fail their checks.
pub fn find_frame(buf: &[u8]) -> Found {
    let mut waiting = false;
    for start in (0..buf.len()).filter(|&i| buf[i] == 0x68) {
        let rest = &buf[start..];
        let Some(&len) = rest.get(9) else {
            // Too short to tell: it may become a frame.
            if rest.get(7).is_none_or(|&b| b == 0x68) {
                waiting = true;
            }
            continue;
        };
        if rest[7] != 0x68 {
            continue;
        }
        let end = FRAME_OVERHEAD + usize::from(len);
        let Some(frame) = rest.get(..end) else {
            waiting = true;
            continue;
        };
        let sum = frame[..end - 2].iter().fold(0u8, |s, &b| s.wrapping_add(b));
        if frame[end - 2] != sum || frame[end - 1] != 0x16 {
            continue;
        }
        let mut address = [0u8; 6];
        address.copy_from_slice(&frame[1..7]);
        let data = frame[10..end - 2]
            .iter()
            .map(|b| b.wrapping_sub(0x33))
            .collect();
        return Found::Frame(
            Frame {
                address: Address(address),
                control: frame[8],
                data,
            },
            start + end,
        );
    }
    if waiting {
        Found::NeedMore
    } else {
        Found::Nothing
    }
}

/// What a frame is to a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// The answer: its data after the echoed DI (read data), or the whole
    /// data (read address).
    Data(Vec<u8>),
    /// An abnormal answer (control code bit 6): the meter's error byte.
    Error(u8),
    /// An answer from this meter to this request that does not fit it
    /// (another DI, too short).
    Mismatch,
    /// Not an answer to this request: another meter's, or a request (an
    /// echo of ours on a two-wire adapter). Skip it and keep reading.
    Other,
}

/// Sorts `frame` as an answer to a request with `control` to `to` (for
/// read data, of `di`).
pub fn reply(frame: &Frame, to: Address, control: u8, di: Option<u32>) -> Reply {
    if frame.control & 0x80 == 0 || frame.control & 0x1F != control {
        return Reply::Other;
    }
    if to != BROADCAST && frame.address != to {
        return Reply::Other;
    }
    if frame.control & 0x40 != 0 {
        return match frame.data.first() {
            Some(&e) => Reply::Error(e),
            None => Reply::Mismatch,
        };
    }
    match di {
        Some(di) => match frame.data.split_first_chunk::<4>() {
            Some((echo, value)) if *echo == di_bytes(di) => Reply::Data(value.to_vec()),
            _ => Reply::Mismatch,
        },
        None => Reply::Data(frame.data.clone()),
    }
}

/// The address a read-address answer carries in its data (6 bytes), or
/// its frame address when the data is short.
pub fn answered_address(frame: &Frame) -> Address {
    match frame.data.first_chunk::<6>() {
        Some(a) => Address(*a),
        None => frame.address,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A meter's answer frame, built independently of `request`.
    fn answer(address: [u8; 6], control: u8, data: &[u8]) -> Vec<u8> {
        let mut f = vec![0x68];
        f.extend_from_slice(&address);
        f.extend_from_slice(&[0x68, control, data.len() as u8]);
        f.extend(data.iter().map(|b| b.wrapping_add(0x33)));
        let cs = f.iter().map(|&b| u32::from(b)).sum::<u32>() as u8;
        f.extend_from_slice(&[cs, 0x16]);
        f
    }

    #[test]
    fn a_read_request_is_the_standard_frame() {
        let a = Address::parse("000000000001").expect("address");
        assert_eq!(a.0, [1, 0, 0, 0, 0, 0]);
        assert_eq!(a.to_string(), "000000000001");
        // Phase A voltage of meter 000000000001, as the standard's examples
        // and the meters' own tools write it.
        assert_eq!(
            read_request(a, 0x0201_0100),
            [
                0xFE, 0xFE, 0xFE, 0xFE, 0x68, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x68, 0x11, 0x04,
                0x33, 0x34, 0x34, 0x35, 0xB6, 0x16
            ]
        );
        let r = request(BROADCAST, READ_ADDRESS, &[]);
        assert_eq!(
            &r[4..],
            [
                0x68, 0xAA, 0xAA, 0xAA, 0xAA, 0xAA, 0xAA, 0x68, 0x13, 0x00, 0xDF, 0x16
            ]
        );
        assert_eq!(
            Address::parse("123456789012").map(|a| a.0),
            Ok([0x12, 0x90, 0x78, 0x56, 0x34, 0x12])
        );
        for bad in ["12345678901", "1234567890123", "12345678901x", ""] {
            assert!(Address::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn frames_are_found_behind_preamble_and_noise_and_checked() {
        let meter = [1, 0, 0, 0, 0, 0];
        let good = answer(meter, 0x91, &[0x00, 0x01, 0x01, 0x02, 0x01, 0x22]);
        let mut noisy = vec![0xFE, 0xFE, 0x00, 0x68, 0x12, 0xFE];
        noisy.extend_from_slice(&good);
        match find_frame(&noisy) {
            Found::Frame(f, end) => {
                assert_eq!(end, noisy.len());
                assert_eq!(f.control, 0x91);
                assert_eq!(f.data, [0x00, 0x01, 0x01, 0x02, 0x01, 0x22]);
                let a = Address(meter);
                assert_eq!(
                    reply(&f, a, READ_DATA, Some(0x0201_0100)),
                    Reply::Data(vec![0x01, 0x22])
                );
                assert_eq!(reply(&f, a, READ_DATA, Some(0x0201_0200)), Reply::Mismatch);
                assert_eq!(
                    reply(
                        &f,
                        Address([2, 0, 0, 0, 0, 0]),
                        READ_DATA,
                        Some(0x0201_0100)
                    ),
                    Reply::Other
                );
            }
            other => panic!("{other:?}"),
        }
        // Every prefix is NeedMore, never a frame or a panic.
        for n in 0..good.len() {
            assert!(!find_frame(&good[..n]).is_frame(), "{n}");
        }
        assert_eq!(find_frame(&good[..good.len() - 1]), Found::NeedMore);
        let mut bad_sum = good.clone();
        let i = bad_sum.len() - 2;
        bad_sum[i] ^= 1;
        assert_eq!(find_frame(&bad_sum), Found::Nothing);
        let mut bad_end = good.clone();
        *bad_end.last_mut().expect("end") = 0x17;
        assert_eq!(find_frame(&bad_end), Found::Nothing);
        // A length longer than what follows waits for more.
        let mut long = good.clone();
        long[9] = 0x40;
        assert_eq!(find_frame(&long), Found::NeedMore);
        // An error frame: control bit 6, the error byte.
        let err = answer(meter, 0xD1, &[0x02]);
        let Found::Frame(f, _) = find_frame(&err) else {
            panic!("error frame not found")
        };
        assert_eq!(
            reply(&f, Address(meter), READ_DATA, Some(1)),
            Reply::Error(2)
        );
        // Our own request echoed back is not an answer.
        let echo = read_request(Address(meter), 0x0201_0100);
        let Found::Frame(f, _) = find_frame(&echo) else {
            panic!("echo not found")
        };
        assert_eq!(
            reply(&f, Address(meter), READ_DATA, Some(0x0201_0100)),
            Reply::Other
        );
    }

    impl Found {
        fn is_frame(&self) -> bool {
            matches!(self, Found::Frame(..))
        }
    }
}
