//! Request planning: the fewest read requests that cover a device's tags.
//!
//! Tags of one table are sorted by address and merged into one request while
//! the request stays within the protocol limit (125 registers, 2000 bits) and
//! the unused span between neighbours is at most `max_gap`.

use super::config::{ModbusTagConfig, Table};

/// One read request and the tags it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRequest {
    pub table: Table,
    pub start: u16,
    pub count: u16,
    /// (index of the tag in the device's tag list, offset of its first item in the response)
    pub tags: Vec<(usize, u16)>,
}

pub fn plan(tags: &[ModbusTagConfig], max_gap: u16) -> Vec<ReadRequest> {
    let mut order: Vec<usize> = (0..tags.len()).collect();
    order.sort_by_key(|&i| (tags[i].table, tags[i].address));
    let mut requests: Vec<ReadRequest> = Vec::new();
    for i in order {
        let tag = &tags[i];
        let (start, end) = (
            u32::from(tag.address),
            u32::from(tag.address) + u32::from(tag.data_type.words()),
        );
        if let Some(last) = requests.last_mut() {
            let last_end = u32::from(last.start) + u32::from(last.count);
            let fits = last.table == tag.table
                && start <= last_end + u32::from(max_gap)
                && end.max(last_end) - u32::from(last.start) <= u32::from(tag.table.max_quantity());
            if fits {
                last.count = (end.max(last_end) - u32::from(last.start)) as u16;
                last.tags.push((i, (start - u32::from(last.start)) as u16));
                continue;
            }
        }
        requests.push(ReadRequest {
            table: tag.table,
            start: tag.address,
            count: tag.data_type.words(),
            tags: vec![(i, 0)],
        });
    }
    requests
}

#[cfg(test)]
mod tests {
    use super::super::config::{ModbusType, WordOrder};
    use super::*;

    fn tag(table: Table, address: u16, data_type: ModbusType) -> ModbusTagConfig {
        ModbusTagConfig {
            name: format!("{}{address}", table.name()),
            table,
            address,
            data_type,
            order: WordOrder::Abcd,
            scale: 1.0,
            offset: 0.0,
            unit: String::new(),
        }
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
        let p = plan(&tags, 16);
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
