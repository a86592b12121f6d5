//! The compiled field-path table: dotted paths turned into a trie of key segments that the
//! scanner walks while it reads the line. Every trie edge (parent node, segment) lives in one
//! open-addressed hash table, so matching a key costs one multiply and, almost always, one
//! bucket compare, whatever the number of paths.
//!
//! Invariants: node 0 is the root (the top-level object) and never carries a slot; every
//! segment is 1..=`SEGMENT_BYTES_MAX` bytes; the edge table is at most a quarter full, so
//! probing always reaches an empty bucket; identical paths share one node and one result slot,
//! so there are at most `PATHS_MAX` slots and a `u64` bitmask covers them.

use super::FieldId;

/// Most paths one table holds; the scanner's "seen" set is a `u64`, one bit per slot.
pub const PATHS_MAX: usize = 64;
/// Longest key segment: keys are short in practice, and a bound keeps config mistakes (a
/// value pasted as a path) visible.
pub const SEGMENT_BYTES_MAX: usize = 128;

const _: () = assert!(PATHS_MAX <= u64::BITS as usize);

pub(super) const NODE_NONE: u32 = u32::MAX;
pub(super) const NODE_ROOT: u32 = 0;
pub(super) const SLOT_NONE: u8 = u8::MAX;
const _: () = assert!(PATHS_MAX < SLOT_NONE as usize);
const _: () = assert!(PATHS_MAX.is_power_of_two());

#[derive(Clone, Debug)]
pub(super) struct Node {
    /// Result slot when a path ends here, else `SLOT_NONE`.
    pub(super) slot: u8,
    has_children: bool,
}

/// One trie edge in the hash table; an empty bucket has `parent == NODE_NONE`.
#[derive(Clone, Debug)]
struct Edge {
    /// The segment's first eight bytes, zero-padded (see `key_prefix`): for the usual short
    /// keys this compare is the whole match, with no call into `memcmp`.
    prefix: u64,
    parent: u32,
    segment_len: u32,
    segment_start: u32,
    child: u32,
}

const EMPTY_EDGE: Edge = Edge {
    prefix: 0,
    parent: NODE_NONE,
    segment_len: 0,
    segment_start: 0,
    child: NODE_NONE,
};

/// One multiply: keys are short and few, and a collision only costs a probe. The top bits of
/// the product are the well-mixed ones: they index the table, and six bits below them pick the
/// edge's bit in the `filter` word.
#[inline(always)]
fn edge_hash(parent: u32, len: usize, prefix: u64) -> u64 {
    let h = prefix ^ ((len as u64) << 56) ^ (u64::from(parent) << 44);
    h.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

#[inline(always)]
fn filter_bit(hash: u64) -> u64 {
    1u64 << ((hash >> 40) & 63)
}

/// The first `min(len, 8)` bytes of `bytes[start..start + len]` as a little-endian integer,
/// zero-padded. Reads past the key when the slice allows, which is the common case since a key
/// is followed by at least `":` and a value.
#[inline(always)]
pub(super) fn key_prefix(bytes: &[u8], start: usize, len: usize) -> u64 {
    debug_assert!(start + len <= bytes.len());
    let word = match bytes.get(start..start + 8) {
        Some(w) => u64::from_le_bytes(w.try_into().expect("eight bytes")),
        None => {
            let mut buf = [0u8; 8];
            let n = len.min(8);
            buf[..n].copy_from_slice(&bytes[start..start + n]);
            u64::from_le_bytes(buf)
        }
    };
    prefix8(word, len)
}

/// `key_prefix` from the eight bytes that start the key, `word` (read past a shorter key).
#[inline(always)]
pub(super) fn prefix8(word: u64, len: usize) -> u64 {
    if len >= 8 {
        word
    } else {
        word & ((1u64 << (len * 8)) - 1)
    }
}

/// Compiled set of dotted field paths, e.g. `["user", "ts", "ctx.device.id"]`.
/// The index of a path in the input is its [`FieldId`].
#[derive(Clone, Debug)]
pub struct FieldTable {
    paths: Vec<String>,
    /// `FieldId` -> result slot (duplicate paths share a slot); a fixed array so that the
    /// lookup, made for every field an event is asked for, needs no bounds check.
    id_slot: [u8; PATHS_MAX],
    slot_count: usize,
    nodes: Vec<Node>,
    /// Power-of-two open-addressed table of trie edges.
    edges: Vec<Edge>,
    /// `u64::BITS - log2(edges.len())`: the hash's top bits index the table.
    edge_shift: u32,
    /// One bit per edge (`filter_bit` of its hash): most keys of an event are not extracted,
    /// and this settles them without touching the table (measured ~20 instructions a key).
    filter: u64,
    segments: Vec<u8>,
}

impl FieldTable {
    /// Err(String) names the bad path: empty path, empty segment ("a..b"), more than 64 paths,
    /// segment > 128 bytes.
    pub fn new(paths: &[String]) -> Result<FieldTable, String> {
        if paths.len() > PATHS_MAX {
            return Err(format!(
                "{} field paths given (first over the limit: {:?}); at most {PATHS_MAX} are supported, \
                 drop unused fields from the profile",
                paths.len(),
                paths[PATHS_MAX]
            ));
        }
        // Build with per-node child lists first, then flatten so that lookups touch one
        // contiguous run of edges.
        struct Building {
            slot: u8,
            children: Vec<(Vec<u8>, u32)>,
        }
        let mut building = vec![Building {
            slot: SLOT_NONE,
            children: Vec::new(),
        }];
        let mut id_slot = [SLOT_NONE; PATHS_MAX];
        let mut slot_count = 0usize;
        for (id, path) in paths.iter().enumerate() {
            if path.is_empty() {
                return Err(
                    "field path \"\" is empty; name a key such as \"user\" or \"ctx.device.id\""
                        .into(),
                );
            }
            let mut node = NODE_ROOT as usize;
            for segment in path.as_bytes().split(|&c| c == b'.') {
                if segment.is_empty() {
                    return Err(format!(
                        "field path {path:?} has an empty segment; separate keys with single dots, e.g. \"ctx.device.id\""
                    ));
                }
                if segment.len() > SEGMENT_BYTES_MAX {
                    return Err(format!(
                        "field path {path:?} has a key segment of {} bytes; the limit is {SEGMENT_BYTES_MAX}",
                        segment.len()
                    ));
                }
                let existing = building[node]
                    .children
                    .iter()
                    .find(|(s, _)| s.as_slice() == segment);
                node = match existing {
                    Some(&(_, child)) => child as usize,
                    None => {
                        let child = building.len();
                        building.push(Building {
                            slot: SLOT_NONE,
                            children: Vec::new(),
                        });
                        building[node]
                            .children
                            .push((segment.to_vec(), child as u32));
                        child
                    }
                };
            }
            if building[node].slot == SLOT_NONE {
                building[node].slot = slot_count as u8;
                slot_count += 1;
            }
            id_slot[id] = building[node].slot;
        }
        assert!(slot_count <= PATHS_MAX);
        assert!(building.len() < NODE_NONE as usize);

        let edge_count = building.len() - 1;
        let buckets = (edge_count * 4).next_power_of_two().max(16);
        let edge_shift = u64::BITS - buckets.trailing_zeros();
        let mut edges = vec![EMPTY_EDGE; buckets];
        let mut segments = Vec::new();
        let mut filter = 0u64;
        let mut nodes = Vec::with_capacity(building.len());
        for (parent, b) in building.iter().enumerate() {
            for (segment, child) in &b.children {
                let prefix = key_prefix(segment, 0, segment.len());
                let hash = edge_hash(parent as u32, segment.len(), prefix);
                filter |= filter_bit(hash);
                let mut i = (hash >> edge_shift) as usize;
                while edges[i].parent != NODE_NONE {
                    i = (i + 1) & (buckets - 1);
                }
                edges[i] = Edge {
                    prefix,
                    parent: parent as u32,
                    segment_len: segment.len() as u32,
                    segment_start: segments.len() as u32,
                    child: *child,
                };
                segments.extend_from_slice(segment);
            }
            nodes.push(Node {
                slot: b.slot,
                has_children: !b.children.is_empty(),
            });
        }
        assert_eq!(nodes[NODE_ROOT as usize].slot, SLOT_NONE);
        assert!(edges.iter().filter(|e| e.parent != NODE_NONE).count() * 4 <= buckets);
        Ok(FieldTable {
            paths: paths.to_vec(),
            id_slot,
            slot_count,
            nodes,
            edges,
            edge_shift,
            filter,
            segments,
        })
    }

    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    pub fn path(&self, id: FieldId) -> &str {
        &self.paths[usize::from(id)]
    }

    pub(super) fn slot_count(&self) -> usize {
        self.slot_count
    }

    pub(super) fn slot_of(&self, id: FieldId) -> u8 {
        debug_assert!(
            usize::from(id) < self.paths.len(),
            "field id {id} of another table"
        );
        // Ids index `paths`, at most PATHS_MAX (a power of two) of them: the mask keeps them.
        self.id_slot[usize::from(id) % PATHS_MAX]
    }

    #[inline(always)]
    pub(super) fn node(&self, node: u32) -> &Node {
        &self.nodes[node as usize]
    }

    #[inline(always)]
    pub(super) fn has_children(&self, node: u32) -> bool {
        self.node(node).has_children
    }

    /// The child of `node` reached by the (unescaped) key, or `NODE_NONE`; `prefix` is
    /// `key_prefix` of the key.
    #[inline(always)]
    pub(super) fn child(&self, node: u32, key: &[u8], prefix: u64) -> u32 {
        let len = key.len();
        let hash = edge_hash(node, len, prefix);
        if self.filter & filter_bit(hash) == 0 {
            return NODE_NONE;
        }
        let mask = self.edges.len() - 1;
        let mut i = (hash >> self.edge_shift) as usize;
        loop {
            let e = &self.edges[i];
            if e.prefix == prefix
                && e.parent == node
                && e.segment_len as usize == len
                && (len <= 8 || self.segments[e.segment_start as usize..][..len] == *key)
            {
                return e.child;
            }
            if e.parent == NODE_NONE {
                return NODE_NONE;
            }
            i = (i + 1) & mask;
        }
    }
}
