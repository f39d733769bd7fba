//! Statistics with the kernel's sysfs names (docs/kernel-contract.md,
//! “Statistics”), plus ours.

#![forbid(unsafe_code)]

/// Kernel memory per VMA that merging adds: `vm_area_struct` plus maple-tree
/// nodes, measured at ~205 bytes per VMA on this machine kind (docs/design.md,
/// “VMA budget”), plus the `anon_vma` (104 B) and `anon_vma_chain` (64 B,
/// `/proc/slabinfo`) that every mapping of the frame pool is given when it is made
/// (`Uffd::prepare_anon_vma`).
pub const VMA_BYTES: u64 = 380;

/// A `std` hash table, as far as giving back memory goes.
pub trait Table {
    fn len_and_capacity(&self) -> (usize, usize);
    fn shrink_to(&mut self, n: usize);
}

impl<K: Eq + std::hash::Hash, V, S: std::hash::BuildHasher> Table
    for std::collections::HashMap<K, V, S>
{
    fn len_and_capacity(&self) -> (usize, usize) {
        (self.len(), self.capacity())
    }
    fn shrink_to(&mut self, n: usize) {
        std::collections::HashMap::shrink_to(self, n);
    }
}

impl<K: Eq + std::hash::Hash, S: std::hash::BuildHasher> Table for std::collections::HashSet<K, S> {
    fn len_and_capacity(&self) -> (usize, usize) {
        (self.len(), self.capacity())
    }
    fn shrink_to(&mut self, n: usize) {
        std::collections::HashSet::shrink_to(self, n);
    }
}

/// Give back most of a table's memory once it holds a quarter of what it could (so
/// that a table that emptied costs nothing; halving again before the next shrink
/// keeps the cost amortized).
pub fn shrink_if_sparse(t: &mut impl Table) {
    let (len, capacity) = t.len_and_capacity();
    if len * 4 < capacity {
        t.shrink_to(len * 2);
    }
}

/// Bytes a `std` hash table (hashbrown) holds for a given `capacity()` with slots of
/// `slot` bytes: `capacity()` is 7/8 of the buckets allocated (all of them below 8),
/// and each bucket has a control byte, plus one group (16) of trailing control bytes.
pub fn hash_table_bytes(capacity: usize, slot: usize) -> usize {
    if capacity == 0 {
        return 0; // an empty table allocates nothing
    }
    let buckets = if capacity < 8 {
        capacity + 1
    } else {
        capacity / 7 * 8
    };
    buckets * (slot + 1) + 16
}

/// One consistent snapshot (taken under the engine's state lock).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub pages_shared: u64,
    pub pages_sharing: u64,
    pub pages_unshared: u64,
    pub pages_volatile: u64,
    pub full_scans: u64,
    pub pages_scanned: u64,
    pub pages_skipped: u64,
    pub stable_node_chains: u64,
    pub stable_node_dups: u64,
    pub ksm_zero_pages: u64,
    pub general_profit: i64,
    // Ours.
    pub rmap_items: u64,
    pub frames: u64,
    pub deferred_frames: u64,
    pub suspect_frames: u64,
    pub pool_bytes: u64,
    pub merges: u64,
    pub merge_failures: u64,
    pub pages_hashed: u64,
    pub cows: u64,
    pub vmas_added: u64,
    pub metadata_bytes: u64,
    pub metadata_peak_bytes: u64,
    pub tracked_pages: u64,
    pub advised_pages: u64,
    pub settled: bool,
    pub vma_budget_skips: u64,
    /// Bytes of the pages put off by the VMA budget (see `Counters::vma_put_off_pages`).
    pub vma_budget_bytes: u64,
    pub unmergeable_pages: u64,
    pub vmas_used: u64,
    /// The most VMAs merging lets the process have: `vm.max_map_count - vma_reserve`.
    pub vma_budget: u64,
}

impl Snapshot {
    /// `(name, value)` pairs in a stable order: the kernel's first, then ours.
    pub fn fields(&self) -> Vec<(&'static str, i64)> {
        let u = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        vec![
            ("pages_shared", u(self.pages_shared)),
            ("pages_sharing", u(self.pages_sharing)),
            ("pages_unshared", u(self.pages_unshared)),
            ("pages_volatile", u(self.pages_volatile)),
            ("full_scans", u(self.full_scans)),
            ("pages_scanned", u(self.pages_scanned)),
            ("pages_skipped", u(self.pages_skipped)),
            ("stable_node_chains", u(self.stable_node_chains)),
            ("stable_node_dups", u(self.stable_node_dups)),
            ("ksm_zero_pages", u(self.ksm_zero_pages)),
            ("general_profit", self.general_profit),
            ("rmap_items", u(self.rmap_items)),
            ("frames", u(self.frames)),
            ("deferred_frames", u(self.deferred_frames)),
            ("suspect_frames", u(self.suspect_frames)),
            ("pool_bytes", u(self.pool_bytes)),
            ("merges", u(self.merges)),
            ("merge_failures", u(self.merge_failures)),
            ("pages_hashed", u(self.pages_hashed)),
            ("cows", u(self.cows)),
            ("vmas_added", u(self.vmas_added)),
            ("metadata_bytes", u(self.metadata_bytes)),
            ("metadata_peak_bytes", u(self.metadata_peak_bytes)),
            ("tracked_pages", u(self.tracked_pages)),
            ("advised_pages", u(self.advised_pages)),
            ("vma_budget_skips", u(self.vma_budget_skips)),
            ("vma_budget_bytes", u(self.vma_budget_bytes)),
            ("unmergeable_pages", u(self.unmergeable_pages)),
            ("vmas_used", u(self.vmas_used)),
            ("vma_budget", u(self.vma_budget)),
            ("settled", i64::from(self.settled)),
        ]
    }

    /// The kernel's `general_profit` (and `ksm_process_profit`), charging our real
    /// costs: bytes of the `pages` saved, minus our bookkeeping and the kernel memory
    /// of the VMAs we added (the kernel charges 64 bytes per rmap_item instead).
    pub fn profit(pages: u64, page: u64, metadata_bytes: u64, vmas_added: u64) -> i64 {
        let saved = i128::from(pages) * i128::from(page);
        let cost = i128::from(metadata_bytes) + i128::from(vmas_added) * i128::from(VMA_BYTES);
        i64::try_from(saved - cost).unwrap_or(i64::MIN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profit_is_savings_minus_costs() {
        assert_eq!(Snapshot::profit(10, 4096, 1000, 2), 40960 - 1000 - 2 * 380);
        assert!(Snapshot::profit(0, 4096, 64, 0) < 0);
    }

    #[test]
    fn hash_tables_are_counted_as_allocated() {
        use std::collections::HashMap;
        for n in [1usize, 3, 7, 8, 100, 10_000] {
            let m: HashMap<u32, u32> = (0..n as u32).map(|i| (i, i)).collect();
            let cap = m.capacity();
            let buckets = hash_table_bytes(cap, 8) - 16;
            // Whole buckets of 9 bytes, a power of two of them, at least n / 0.875.
            assert_eq!(buckets % 9, 0, "n = {n}");
            let b = buckets / 9;
            assert!(
                b.is_power_of_two() && b * 7 >= n * 8 - 7,
                "n = {n}: {b} buckets"
            );
        }
        assert_eq!(hash_table_bytes(0, 8), 0);
    }

    #[test]
    fn fields_start_with_the_kernel_names() {
        let f = Snapshot::default().fields();
        let names: Vec<_> = f.iter().map(|(n, _)| *n).take(11).collect();
        assert_eq!(
            names,
            [
                "pages_shared",
                "pages_sharing",
                "pages_unshared",
                "pages_volatile",
                "full_scans",
                "pages_scanned",
                "pages_skipped",
                "stable_node_chains",
                "stable_node_dups",
                "ksm_zero_pages",
                "general_profit"
            ]
        );
    }
}

/// `/proc/self/ksm_stat` (docs/kernel-contract.md, "Per-process statistics").
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KsmStat {
    pub ksm_rmap_items: u64,
    pub ksm_zero_pages: u64,
    /// Pages of this process that map a shared frame (first sharers included).
    pub ksm_merging_pages: u64,
    pub ksm_process_profit: i64,
    pub ksm_merge_any: bool,
    /// Whether any page is advised mergeable.
    pub ksm_mergeable: bool,
}
