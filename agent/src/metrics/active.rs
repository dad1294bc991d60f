//! Connections open now, by listener and data path: each connection holds an
//! [`ActiveConnection`] from the moment its data path is chosen until it ends or moves to
//! another agent (dropped with it), and one that changes path before any byte moves (sockmap
//! refused, splice taken) is moved to the new label.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::outcome::DataPath;

/// The open connections by (listener index, data path).
#[derive(Debug, Default)]
pub(crate) struct ActiveTable(Mutex<BTreeMap<(u16, DataPath), i64>>);

impl ActiveTable {
    fn add(&self, key: (u16, DataPath), delta: i64) {
        let mut table = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = table.entry(key).or_insert(0);
        *n += delta;
    }

    /// Every (listener index, data path) seen, with its count now.
    pub(crate) fn counts(&self) -> Vec<((u16, DataPath), i64)> {
        let table = self.0.lock().unwrap_or_else(|p| p.into_inner());
        table.iter().map(|(k, v)| (*k, *v)).collect()
    }
}

/// One open connection's place in [`ActiveTable`]; given back when dropped.
#[derive(Debug)]
pub struct ActiveConnection {
    table: Arc<ActiveTable>,
    key: (u16, DataPath),
}

impl ActiveConnection {
    pub(crate) fn new(table: Arc<ActiveTable>, listener: u16, path: DataPath) -> Self {
        let key = (listener, path);
        table.add(key, 1);
        Self { table, key }
    }

    /// The connection took another data path.
    pub fn relabel(&mut self, path: DataPath) {
        if self.key.1 != path {
            self.table.add(self.key, -1);
            self.key.1 = path;
            self.table.add(self.key, 1);
        }
    }
}

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        self.table.add(self.key, -1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_follow_the_connection() {
        let table = Arc::new(ActiveTable::default());
        let a = ActiveConnection::new(table.clone(), 0, DataPath::Ktls);
        let mut b = ActiveConnection::new(table.clone(), 0, DataPath::Sockmap);
        b.relabel(DataPath::Splice);
        let count = |p| {
            table
                .counts()
                .into_iter()
                .find(|(k, _)| *k == (0, p))
                .map_or(0, |(_, n)| n)
        };
        assert_eq!(
            (
                count(DataPath::Ktls),
                count(DataPath::Sockmap),
                count(DataPath::Splice)
            ),
            (1, 0, 1)
        );
        drop((a, b));
        assert_eq!((count(DataPath::Ktls), count(DataPath::Splice)), (0, 0));
    }
}
