//! S7comm over ISO-on-TCP, as far as reading needs: TPKT (RFC 1006) frames
//! carrying COTP (ISO 8073 class 0) and S7 PDUs — connection request, setup
//! communication (PDU size), read var with several items, and read SZL (the
//! system status list, for the CPU's identity).
//!
//! Pure encoding and decoding; every length read from the wire is checked
//! before use, and a malformed answer is an error naming what is wrong.

/// The PDU size the gateway asks for (the CPU may offer less).
pub const WANTED_PDU: u16 = 960;
/// S7 ack-data header (12) + function and item count (2).
pub const READ_RESPONSE_OVERHEAD: usize = 14;
/// S7 job header (10) + function and item count (2).
pub const READ_REQUEST_OVERHEAD: usize = 12;
/// One item in a read request.
pub const REQUEST_ITEM_BYTES: usize = 12;
/// Return code, transport size and length before an item's data.
pub const RESPONSE_ITEM_HEADER: usize = 4;
/// Items one read request may hold (S7 limit).
pub const MAX_ITEMS: usize = 20;

const TPKT_VERSION: u8 = 3;
const COTP_CR: u8 = 0xE0;
const COTP_CC: u8 = 0xD0;
const COTP_DT: u8 = 0xF0;
const S7_PROTOCOL: u8 = 0x32;
const ROSCTR_JOB: u8 = 0x01;
const ROSCTR_ACK_DATA: u8 = 0x03;
const ROSCTR_USERDATA: u8 = 0x07;
const FN_SETUP: u8 = 0xF0;
const FN_READ: u8 = 0x04;
const LOCAL_TSAP: u16 = 0x0100;

/// A TPKT frame around `payload`.
fn tpkt(payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() + 4) as u16;
    let mut f = Vec::with_capacity(len as usize);
    f.extend_from_slice(&[TPKT_VERSION, 0]);
    f.extend_from_slice(&len.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The COTP connection request to `remote_tsap` (TPDU size 1024).
pub fn connect_request(remote_tsap: u16) -> Vec<u8> {
    let [lh, ll] = LOCAL_TSAP.to_be_bytes();
    let [rh, rl] = remote_tsap.to_be_bytes();
    tpkt(&[
        17, COTP_CR, 0, 0, 0, 1, 0, // length, CR, dst ref, src ref, class 0
        0xC1, 2, lh, ll, // calling TSAP
        0xC2, 2, rh, rl, // called TSAP
        0xC0, 1, 0x0A, // TPDU size 1024
    ])
}

/// Checks a COTP connection confirm (the payload of a TPKT frame).
pub fn check_connect_confirm(payload: &[u8]) -> Result<(), String> {
    match payload {
        [len, COTP_CC, ..] if usize::from(*len) < payload.len() => Ok(()),
        [_, t, ..] => Err(format!(
            "the PLC refused the connection (COTP {t:#04x}, not a connection confirm): check rack and slot, or tsap"
        )),
        _ => Err("a COTP answer too short to read".into()),
    }
}

/// An S7 job in a COTP data frame.
fn job(pdu_ref: u16, params: &[u8]) -> Vec<u8> {
    let mut p = vec![2, COTP_DT, 0x80, S7_PROTOCOL, ROSCTR_JOB, 0, 0];
    p.extend_from_slice(&pdu_ref.to_be_bytes());
    p.extend_from_slice(&(params.len() as u16).to_be_bytes());
    p.extend_from_slice(&0u16.to_be_bytes());
    p.extend_from_slice(params);
    tpkt(&p)
}

/// Setup communication, asking for `WANTED_PDU`.
pub fn setup_request() -> Vec<u8> {
    let mut params = vec![FN_SETUP, 0, 0, 1, 0, 1];
    params.extend_from_slice(&WANTED_PDU.to_be_bytes());
    job(0, &params)
}

/// The S7 part of a COTP data frame's payload: (parameters, data), after
/// checking it is an ack-data without an error.
fn ack_data(payload: &[u8]) -> Result<(&[u8], &[u8]), String> {
    let s7 = match payload {
        [2, COTP_DT, _, rest @ ..] => rest,
        _ => return Err("not a COTP data frame".into()),
    };
    if s7.len() < 12 || s7[0] != S7_PROTOCOL {
        return Err("not an S7 answer".into());
    }
    if s7[1] != ROSCTR_ACK_DATA {
        return Err(format!("S7 message type {:#04x}, expected ack-data", s7[1]));
    }
    let (class, code) = (s7[10], s7[11]);
    if class != 0 || code != 0 {
        return Err(format!(
            "the PLC answered with error class {class:#04x} code {code:#04x}{}",
            if class == 0x81 || class == 0x85 {
                " (no access: on S7-1200/1500 enable PUT/GET and use non-optimized data blocks)"
            } else {
                ""
            }
        ));
    }
    let plen = usize::from(u16::from_be_bytes([s7[6], s7[7]]));
    let dlen = usize::from(u16::from_be_bytes([s7[8], s7[9]]));
    let body = &s7[12..];
    if body.len() < plen + dlen {
        return Err(format!(
            "S7 answer shorter than its lengths say ({} < {})",
            body.len(),
            plen + dlen
        ));
    }
    Ok((&body[..plen], &body[plen..plen + dlen]))
}

/// The PDU size the CPU granted.
pub fn setup_response(payload: &[u8]) -> Result<u16, String> {
    let (params, _) = ack_data(payload)?;
    match params {
        [FN_SETUP, _, _, _, _, _, h, l, ..] => {
            let pdu = u16::from_be_bytes([*h, *l]);
            if pdu < 64 {
                return Err(format!(
                    "the PLC granted a PDU of {pdu} bytes, too small to read"
                ));
            }
            Ok(pdu)
        }
        _ => Err("setup communication answer without its parameters".into()),
    }
}

/// Area code of the timers (S5TIME words, addressed by number).
pub const AREA_TIMERS: u8 = 0x1D;
/// Area code of the counters (BCD words, addressed by number).
pub const AREA_COUNTERS: u8 = 0x1C;

/// One item to read: `bytes` from `start` of an area. Timers and counters
/// are two bytes each: `start` and `bytes` are twice their number and count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadItem {
    pub area: u8,
    pub db: u16,
    pub start: u32,
    pub bytes: u16,
}

/// A read var request for `items` (as bytes; timers and counters as such).
pub fn read_request(pdu_ref: u16, items: &[ReadItem]) -> Vec<u8> {
    let mut params = Vec::with_capacity(2 + items.len() * REQUEST_ITEM_BYTES);
    params.extend_from_slice(&[FN_READ, items.len() as u8]);
    for it in items {
        // Transport size: the area's own for timers and counters, else byte.
        let (size, count, address) = match it.area {
            AREA_TIMERS | AREA_COUNTERS => (it.area, it.bytes / 2, it.start / 2),
            _ => (0x02, it.bytes, it.start * 8),
        };
        params.extend_from_slice(&[0x12, 0x0A, 0x10, size]);
        params.extend_from_slice(&count.to_be_bytes());
        params.extend_from_slice(&it.db.to_be_bytes());
        params.push(it.area);
        params.extend_from_slice(&[(address >> 16) as u8, (address >> 8) as u8, address as u8]);
    }
    job(pdu_ref, &params)
}

/// The answer to one item: its bytes, or the S7 return code.
pub type ItemResult = Result<Vec<u8>, u8>;

/// The items of a read var answer, in request order; `expected` items.
pub fn read_response(payload: &[u8], expected: usize) -> Result<Vec<ItemResult>, String> {
    let (params, data) = ack_data(payload)?;
    match params {
        [FN_READ, n] if usize::from(*n) == expected => {}
        [FN_READ, n] => return Err(format!("{n} items answered, {expected} asked")),
        _ => return Err("read answer without its parameters".into()),
    }
    let mut out = Vec::with_capacity(expected);
    let mut rest = data;
    for i in 0..expected {
        let [code, size, h, l, tail @ ..] = rest else {
            return Err(format!("item {i} cut short"));
        };
        let len = usize::from(u16::from_be_bytes([*h, *l]));
        // Transport sizes 3 (bit), 4 (byte/word/dword) count bits.
        let len = if matches!(size, 3..=5) {
            len.div_ceil(8)
        } else {
            len
        };
        if *code != 0xFF {
            out.push(Err(*code));
            rest = tail;
            continue;
        }
        if tail.len() < len {
            return Err(format!("item {i}: {} bytes of {len}", tail.len()));
        }
        out.push(Ok(tail[..len].to_vec()));
        // Items after one of odd length are aligned on even bytes.
        let pad = usize::from(len % 2 == 1 && i + 1 < expected);
        rest = tail.get(len + pad..).unwrap_or_default();
    }
    Ok(out)
}

/// A userdata PDU (S7 header without error bytes) in a COTP data frame.
fn userdata(pdu_ref: u16, params: &[u8], data: &[u8]) -> Vec<u8> {
    let mut p = vec![2, COTP_DT, 0x80, S7_PROTOCOL, ROSCTR_USERDATA, 0, 0];
    p.extend_from_slice(&pdu_ref.to_be_bytes());
    p.extend_from_slice(&(params.len() as u16).to_be_bytes());
    p.extend_from_slice(&(data.len() as u16).to_be_bytes());
    p.extend_from_slice(params);
    p.extend_from_slice(data);
    tpkt(&p)
}

/// SZL of the module identification (order number: record index 1).
pub const SZL_MODULE_ID: u16 = 0x0011;
/// SZL of the component identification (names, serial number, module type).
pub const SZL_COMPONENT_ID: u16 = 0x001C;

/// Read SZL `id` with `index` (userdata, CPU functions, first part).
pub fn szl_request(pdu_ref: u16, id: u16, index: u16) -> Vec<u8> {
    let params = [0x00, 0x01, 0x12, 0x04, 0x11, 0x44, 0x01, 0x00];
    let mut data = vec![0xFF, 0x09, 0x00, 0x04];
    data.extend_from_slice(&id.to_be_bytes());
    data.extend_from_slice(&index.to_be_bytes());
    userdata(pdu_ref, &params, &data)
}

/// Asks for the part after the one numbered `sequence` of a long SZL answer.
pub fn szl_next_request(pdu_ref: u16, sequence: u8) -> Vec<u8> {
    let params = [
        0x00, 0x01, 0x12, 0x08, 0x12, 0x44, 0x01, sequence, 0, 0, 0, 0,
    ];
    userdata(pdu_ref, &params, &[0x0A, 0x00, 0x00, 0x00])
}

/// One part of an SZL answer.
#[derive(Debug, PartialEq, Eq)]
pub struct SzlPart {
    /// To name in `szl_next_request` when `more` follows.
    pub sequence: u8,
    pub more: bool,
    pub data: Vec<u8>,
}

/// An SZL answer's part: the list's bytes (the first part starts with the
/// SZL id, index, record length and record count).
pub fn szl_response(payload: &[u8]) -> Result<SzlPart, String> {
    let s7 = match payload {
        [2, COTP_DT, _, rest @ ..] => rest,
        _ => return Err("not a COTP data frame".into()),
    };
    if s7.len() < 10 || s7[0] != S7_PROTOCOL || s7[1] != ROSCTR_USERDATA {
        return Err("not an S7 userdata answer".into());
    }
    let plen = usize::from(u16::from_be_bytes([s7[6], s7[7]]));
    let dlen = usize::from(u16::from_be_bytes([s7[8], s7[9]]));
    let body = &s7[10..];
    if body.len() < plen + dlen || plen < 12 {
        return Err(format!(
            "SZL answer shorter than its lengths say ({} < {})",
            body.len(),
            plen.max(12) + dlen
        ));
    }
    let (params, data) = (&body[..plen], &body[plen..plen + dlen]);
    let error = u16::from_be_bytes([params[10], params[11]]);
    if error != 0 {
        return Err(format!("the CPU refused the SZL read (error {error:#06x})"));
    }
    match data {
        [0xFF, _, h, l, rest @ ..] => {
            let len = usize::from(u16::from_be_bytes([*h, *l]));
            let part = rest
                .get(..len)
                .ok_or_else(|| format!("SZL data of {} bytes, {len} announced", rest.len()))?;
            Ok(SzlPart {
                sequence: params[7],
                more: params[9] != 0,
                data: part.to_vec(),
            })
        }
        [code, ..] => Err(format!(
            "the CPU refused the SZL read (return code {code:#04x})"
        )),
        [] => Err("SZL answer without data".into()),
    }
}

/// The records of an SZL list (`list` as gathered from its parts), each as
/// (record index, record bytes after the index). A list whose header gives
/// no record length (some emulators) is read as `default_len`-byte records.
pub fn szl_records(list: &[u8], default_len: usize) -> Vec<(u16, &[u8])> {
    let Some(header) = list.get(4..8) else {
        return Vec::new();
    };
    let announced = usize::from(u16::from_be_bytes([header[0], header[1]]));
    let len = if announced >= 2 {
        announced
    } else {
        default_len
    };
    list[8..]
        .chunks_exact(len)
        .map(|r| (u16::from_be_bytes([r[0], r[1]]), &r[2..]))
        .collect()
}

/// Text of an SZL record field: up to its first NUL, printable, trimmed.
pub fn szl_text(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end])
        .chars()
        .filter(|c| !c.is_control())
        .collect::<String>()
        .trim()
        .to_string()
}

/// The payload of a TPKT frame whose 4-byte header is `header`: its length.
pub fn tpkt_payload_len(header: [u8; 4]) -> Result<usize, String> {
    if header[0] != TPKT_VERSION {
        return Err(format!("not a TPKT frame (version {})", header[0]));
    }
    let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    len.checked_sub(4)
        .filter(|n| *n >= 2)
        .ok_or_else(|| format!("TPKT length {len} too short"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_laid_out_as_s7comm_says() {
        let cr = connect_request(0x0102);
        assert_eq!(&cr[..4], &[3, 0, 0, 22]);
        assert_eq!(&cr[15..19], &[0xC2, 2, 0x01, 0x02]);
        let r = read_request(
            7,
            &[ReadItem {
                area: 0x84,
                db: 1,
                start: 4,
                bytes: 10,
            }],
        );
        // TPKT 4 + COTP 3 + header 10 + params 2 + item 12.
        assert_eq!(r.len(), 31);
        assert_eq!(
            &r[19..31],
            &[0x12, 0x0A, 0x10, 2, 0, 10, 0, 1, 0x84, 0, 0, 32]
        );
    }

    fn answer(params: &[u8], data: &[u8]) -> Vec<u8> {
        let mut p = vec![2, COTP_DT, 0x80, S7_PROTOCOL, ROSCTR_ACK_DATA, 0, 0, 0, 1];
        p.extend_from_slice(&(params.len() as u16).to_be_bytes());
        p.extend_from_slice(&(data.len() as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(params);
        p.extend_from_slice(data);
        p
    }

    fn userdata_answer(params: &[u8], data: &[u8]) -> Vec<u8> {
        let mut p = vec![2, COTP_DT, 0x80, S7_PROTOCOL, ROSCTR_USERDATA, 0, 0, 0, 1];
        p.extend_from_slice(&(params.len() as u16).to_be_bytes());
        p.extend_from_slice(&(data.len() as u16).to_be_bytes());
        p.extend_from_slice(params);
        p.extend_from_slice(data);
        p
    }

    #[test]
    fn szl_answers_give_their_records_in_parts_and_refusals_say_so() {
        let request = szl_request(5, SZL_MODULE_ID, 0);
        assert_eq!(&request[4..9], &[2, COTP_DT, 0x80, 0x32, 0x07]);
        assert_eq!(
            &request[request.len() - 8..],
            &[0xFF, 9, 0, 4, 0, 0x11, 0, 0]
        );
        // The order number list as a CPU sends it: one record of 28 bytes.
        let mut list = vec![0x00, 0x11, 0x00, 0x00, 0x00, 28, 0x00, 1, 0x00, 0x01];
        list.extend_from_slice(b"6ES7 214-1AG40-0XB0 ");
        list.extend_from_slice(&[0, 0xC0, 0, 4, 0, 1]);
        let mut data = vec![0xFF, 0x09];
        data.extend_from_slice(&(list.len() as u16).to_be_bytes());
        data.extend_from_slice(&list);
        let params = [0, 1, 0x12, 8, 0x12, 0x84, 1, 3, 0, 1, 0, 0];
        let part = szl_response(&userdata_answer(&params, &data)).expect("decoded");
        assert_eq!((part.sequence, part.more), (3, true));
        let records = szl_records(&part.data, 28);
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].0, 1);
        assert_eq!(szl_text(&records[0].1[..20]), "6ES7 214-1AG40-0XB0");
        // Records without a header length (an emulator): read at the default.
        let mut bare = vec![0x00, 0x1C, 0, 0, 0, 0, 0, 0];
        bare.extend_from_slice(&[0u8; 68]);
        assert_eq!(szl_records(&bare, 34).len(), 2);
        let mut refused = params;
        refused[10..12].copy_from_slice(&[0xD4, 0x01]);
        assert!(
            szl_response(&userdata_answer(&refused, &[0x0A, 0, 0, 0]))
                .expect_err("refused")
                .contains("0xd401")
        );
        assert!(szl_response(&userdata_answer(&params, &[0x0A, 0, 0, 0])).is_err());
        for junk in [&[][..], &[2, 0xF0, 0x80, 0x32, 7], &[9; 40]] {
            assert!(szl_response(junk).is_err());
        }
        assert!(szl_records(&[1, 2, 3], 34).is_empty());
    }

    #[test]
    fn answers_decode_items_padding_and_codes_and_refuse_short_bytes() {
        let data = [
            0xFF, 4, 0, 24, 1, 2, 3, 0, // 3 bytes + pad
            0x0A, 0, 0, 0, // object does not exist
            0xFF, 4, 0, 16, 9, 8,
        ];
        let items = read_response(&answer(&[FN_READ, 3], &data), 3).expect("decoded");
        assert_eq!(items, vec![Ok(vec![1, 2, 3]), Err(0x0A), Ok(vec![9, 8])]);
        assert!(read_response(&answer(&[FN_READ, 2], &data), 3).is_err());
        assert!(read_response(&answer(&[FN_READ, 1], &[0xFF, 4, 0, 80, 1]), 1).is_err());
        assert_eq!(
            setup_response(&answer(&[FN_SETUP, 0, 0, 1, 0, 1, 0, 240], &[])),
            Ok(240)
        );
        for junk in [&[][..], &[2, 0xF0], &[2, 0xF0, 0x80, 0x32, 3], &[9; 40]] {
            assert!(read_response(junk, 1).is_err());
            assert!(setup_response(junk).is_err());
        }
        let mut refused = answer(&[FN_READ, 1], &[]);
        refused[13] = 0x81;
        assert!(
            read_response(&refused, 1)
                .expect_err("class")
                .contains("PUT/GET")
        );
    }
}
