//! Request planning: the fewest read requests that cover a device's tags.
//!
//! Tags of one table are sorted by address and merged into one request while
//! the request stays within the protocol limit (125 registers, 2000 bits) and
//! the unused span between neighbours is at most `max_gap`.
//!
//! When a device answers a merged request with an exception (it lacks an
//! address inside the range), the collector bisects it (`halve`, recursively)
//! until the refused tags stand alone: the parts the device answers stay
//! merged reads, so a hole in the map costs a few requests, never data.
//! `halve` keeps each half as tight as its tags, so a register that no tag
//! uses drops out of the reads once its neighbours are in different halves.

use super::config::Table;
use super::decode::TagReader;

/// One read request and the tags it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRequest {
    pub table: Table,
    pub start: u16,
    pub count: u16,
    /// (index of the tag in the device's tag list, offset of its first item in the response)
    pub tags: Vec<(usize, u16)>,
    /// Every tag is a plain `u16` (`TagReader::is_plain_u16`): the collector
    /// then copies registers into values without decoding each tag.
    pub plain_u16: bool,
}

/// Plans the tags of `tags` listed in `select` (indices into `tags`), with
/// register requests of at most `max_registers` (bits: always 2000).
pub fn plan(
    tags: &[TagReader],
    select: &[usize],
    max_gap: u16,
    max_registers: u16,
) -> Vec<ReadRequest> {
    let limit = |t: Table| {
        if t.is_bits() {
            t.max_quantity()
        } else {
            t.max_quantity().min(max_registers.max(1))
        }
    };
    let mut order: Vec<usize> = select.to_vec();
    order.sort_by_key(|&i| (tags[i].table, tags[i].address));
    let mut requests: Vec<ReadRequest> = Vec::new();
    for i in order {
        let tag = &tags[i];
        let (start, end) = (
            u32::from(tag.address),
            u32::from(tag.address) + u32::from(tag.words),
        );
        if let Some(last) = requests.last_mut() {
            let last_end = u32::from(last.start) + u32::from(last.count);
            let fits = last.table == tag.table
                && start <= last_end + u32::from(max_gap)
                && end.max(last_end) - u32::from(last.start) <= u32::from(limit(tag.table));
            if fits {
                last.count = (end.max(last_end) - u32::from(last.start)) as u16;
                last.tags.push((i, (start - u32::from(last.start)) as u16));
                last.plain_u16 &= tag.is_plain_u16();
                continue;
            }
        }
        requests.push(ReadRequest {
            table: tag.table,
            start: tag.address,
            count: tag.words,
            tags: vec![(i, 0)],
            plain_u16: tag.is_plain_u16(),
        });
    }
    requests
}

/// The two halves (by tag count, in address order) of a request of at least
/// two tags, each covering only its own tags; `None` for a single tag.
pub fn halve(tags: &[TagReader], r: &ReadRequest) -> Option<(ReadRequest, ReadRequest)> {
    if r.tags.len() < 2 {
        return None;
    }
    let (a, b) = r.tags.split_at(r.tags.len() / 2);
    Some((cover(tags, r.table, a), cover(tags, r.table, b)))
}

/// The tightest request of `table` that reads the tags `part` (not empty).
fn cover(tags: &[TagReader], table: Table, part: &[(usize, u16)]) -> ReadRequest {
    let start = part
        .iter()
        .map(|&(i, _)| tags[i].address)
        .min()
        .unwrap_or(0);
    let end = part
        .iter()
        .map(|&(i, _)| u32::from(tags[i].address) + u32::from(tags[i].words))
        .max()
        .unwrap_or(u32::from(start));
    ReadRequest {
        table,
        start,
        count: (end - u32::from(start)) as u16,
        tags: part
            .iter()
            .map(|&(i, _)| (i, tags[i].address - start))
            .collect(),
        plain_u16: part.iter().all(|&(i, _)| tags[i].is_plain_u16()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::{ModbusTagConfig, ModbusType};
    use super::*;

    fn tag(table: Table, address: u16, data_type: ModbusType) -> TagReader {
        TagReader::new(&ModbusTagConfig::new(
            &format!("{}{address}", table.name()),
            table,
            address,
            data_type,
        ))
    }

    fn all(tags: &[TagReader]) -> Vec<usize> {
        (0..tags.len()).collect()
    }

    #[test]
    fn contiguous_registers_take_the_minimum_number_of_requests() {
        // 300 consecutive u16: ceil(300 / 125) = 3 requests, the minimum.
        let tags: Vec<_> = (0..300)
            .map(|a| tag(Table::Holding, a, ModbusType::U16))
            .collect();
        let p = plan(&tags, &all(&tags), 0, 125);
        let summary: Vec<_> = p.iter().map(|r| (r.start, r.count)).collect();
        assert_eq!(summary, vec![(0, 125), (125, 125), (250, 50)]);
        // 4000 coils: 2 requests of 2000.
        let bits: Vec<_> = (0..4000)
            .map(|a| tag(Table::Coil, a, ModbusType::Bool))
            .collect();
        assert_eq!(plan(&bits, &all(&bits), 0, 125).len(), 2);
        // A device limit on registers per read is honoured.
        let p = plan(&tags, &all(&tags), 0, 80);
        assert_eq!(
            p.iter().map(|r| r.count).collect::<Vec<_>>(),
            vec![80, 80, 80, 60]
        );
        // A 64-bit value never straddles two requests.
        let mut t: Vec<_> = (0..123)
            .map(|a| tag(Table::Input, a, ModbusType::U16))
            .collect();
        t.push(tag(Table::Input, 123, ModbusType::F64));
        let p = plan(&t, &all(&t), 0, 125);
        assert_eq!(
            p.iter().map(|r| (r.start, r.count)).collect::<Vec<_>>(),
            vec![(0, 123), (123, 4)]
        );
    }

    #[test]
    fn halving_keeps_each_half_tight_and_stops_at_one_tag() {
        let tags = vec![
            tag(Table::Holding, 0, ModbusType::U16),
            tag(Table::Holding, 1, ModbusType::F32),
            tag(Table::Holding, 5, ModbusType::U16),
            tag(Table::Holding, 9, ModbusType::U32),
        ];
        let p = plan(&tags, &all(&tags), 16, 125);
        assert_eq!(p.len(), 1);
        let (a, b) = halve(&tags, &p[0]).expect("four tags halve");
        let summary = |r: &ReadRequest| (r.start, r.count, r.tags.clone(), r.plain_u16);
        assert_eq!(summary(&a), (0, 3, vec![(0, 0), (1, 1)], false));
        assert_eq!(summary(&b), (5, 6, vec![(2, 0), (3, 4)], false));
        let (c, d) = halve(&tags, &a).expect("two tags halve");
        assert_eq!(summary(&c), (0, 1, vec![(0, 0)], true));
        assert_eq!(summary(&d), (1, 2, vec![(1, 0)], false));
        assert_eq!(halve(&tags, &c), None);
        // Planning only a selection leaves the others out.
        let p = plan(&tags, &[0, 2], 16, 125);
        assert_eq!(p[0].tags, vec![(0, 0), (2, 5)]);
    }

    #[test]
    fn merges_neighbours_and_splits_tables_gaps_and_limits() {
        let tags = vec![
            tag(Table::Holding, 10, ModbusType::F32),
            tag(Table::Holding, 0, ModbusType::U16),
            tag(Table::Holding, 2, ModbusType::U32),
            tag(Table::Holding, 100, ModbusType::U16), // gap of 88 > 16
            tag(Table::Input, 0, ModbusType::U16),
            tag(Table::Coil, 5, ModbusType::Bool),
            tag(Table::Coil, 0, ModbusType::Bool),
            tag(Table::Holding, 220, ModbusType::U16), // 100..221 would exceed 125
        ];
        let p = plan(&tags, &all(&tags), 16, 125);
        let summary: Vec<_> = p.iter().map(|r| (r.table, r.start, r.count)).collect();
        assert_eq!(
            summary,
            vec![
                (Table::Coil, 0, 6),
                (Table::Input, 0, 1),
                (Table::Holding, 0, 12),
                (Table::Holding, 100, 1),
                (Table::Holding, 220, 1),
            ]
        );
        assert_eq!(p[2].tags, vec![(1, 0), (2, 2), (0, 10)]);
    }
}
