//! The compiled field-path table: dotted paths turned into a trie of key segments that the
//! scanner walks while it reads the line, so matching a key costs one length-bitmask test and,
//! only on a length hit, a few short byte compares.
//!
//! Invariants: node 0 is the root (the top-level object) and never carries a slot; each node's
//! outgoing edges are contiguous in `edges`; every segment is 1..=`SEGMENT_BYTES_MAX` bytes, so
//! bit `len - 1` of `len_mask` fits in a `u128`; identical paths share one node and one result
//! slot, so there are at most `PATHS_MAX` slots and a `u64` bitmask covers them.

use super::FieldId;

/// Most paths one table holds; the scanner's "seen" set is a `u64`, one bit per slot.
pub const PATHS_MAX: usize = 64;
/// Longest key segment; lets the per-node length filter be a single `u128`.
pub const SEGMENT_BYTES_MAX: usize = 128;

const _: () = assert!(PATHS_MAX <= u64::BITS as usize);
const _: () = assert!(SEGMENT_BYTES_MAX <= u128::BITS as usize);

pub(super) const NODE_NONE: u32 = u32::MAX;
pub(super) const NODE_ROOT: u32 = 0;
pub(super) const SLOT_NONE: u8 = u8::MAX;
const _: () = assert!(PATHS_MAX < SLOT_NONE as usize);

#[derive(Clone, Debug)]
pub(super) struct Node {
    /// Result slot when a path ends here, else `SLOT_NONE`.
    pub(super) slot: u8,
    edges_start: u32,
    edges_end: u32,
    /// Bit `len - 1` is set when some child segment is `len` bytes long.
    len_mask: u128,
}

#[derive(Clone, Debug)]
struct Edge {
    segment_start: u32,
    segment_len: u32,
    child: u32,
}

/// Compiled set of dotted field paths, e.g. `["user", "ts", "ctx.device.id"]`.
/// The index of a path in the input is its [`FieldId`].
#[derive(Clone, Debug)]
pub struct FieldTable {
    paths: Vec<String>,
    /// `FieldId` -> result slot (duplicate paths share a slot).
    id_slot: Vec<u8>,
    slot_count: usize,
    nodes: Vec<Node>,
    edges: Vec<Edge>,
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
        let mut building = vec![Building { slot: SLOT_NONE, children: Vec::new() }];
        let mut id_slot = Vec::with_capacity(paths.len());
        let mut slot_count = 0usize;
        for path in paths {
            if path.is_empty() {
                return Err("field path \"\" is empty; name a key such as \"user\" or \"ctx.device.id\"".into());
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
                let existing = building[node].children.iter().find(|(s, _)| s.as_slice() == segment);
                node = match existing {
                    Some(&(_, child)) => child as usize,
                    None => {
                        let child = building.len();
                        building.push(Building { slot: SLOT_NONE, children: Vec::new() });
                        building[node].children.push((segment.to_vec(), child as u32));
                        child
                    }
                };
            }
            if building[node].slot == SLOT_NONE {
                building[node].slot = slot_count as u8;
                slot_count += 1;
            }
            id_slot.push(building[node].slot);
        }
        assert!(slot_count <= PATHS_MAX);
        assert!(building.len() < NODE_NONE as usize);

        let mut nodes = Vec::with_capacity(building.len());
        let mut edges = Vec::new();
        let mut segments = Vec::new();
        for b in &building {
            let edges_start = edges.len() as u32;
            let mut len_mask = 0u128;
            for (segment, child) in &b.children {
                len_mask |= 1u128 << (segment.len() - 1);
                edges.push(Edge {
                    segment_start: segments.len() as u32,
                    segment_len: segment.len() as u32,
                    child: *child,
                });
                segments.extend_from_slice(segment);
            }
            nodes.push(Node { slot: b.slot, edges_start, edges_end: edges.len() as u32, len_mask });
        }
        assert_eq!(nodes[NODE_ROOT as usize].slot, SLOT_NONE);
        Ok(FieldTable { paths: paths.to_vec(), id_slot, slot_count, nodes, edges, segments })
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
        self.id_slot[usize::from(id)]
    }

    #[inline(always)]
    pub(super) fn node(&self, node: u32) -> &Node {
        &self.nodes[node as usize]
    }

    #[inline(always)]
    pub(super) fn has_children(&self, node: u32) -> bool {
        let n = self.node(node);
        n.edges_end > n.edges_start
    }

    /// The child of `node` reached by the (unescaped) key, or `NODE_NONE`.
    #[inline(always)]
    pub(super) fn child(&self, node: u32, key: &[u8]) -> u32 {
        let n = self.node(node);
        let len = key.len();
        if len == 0 || len > SEGMENT_BYTES_MAX || n.len_mask & (1u128 << (len - 1)) == 0 {
            return NODE_NONE;
        }
        for e in &self.edges[n.edges_start as usize..n.edges_end as usize] {
            if e.segment_len as usize == len && self.segments[e.segment_start as usize..][..len] == *key {
                return e.child;
            }
        }
        NODE_NONE
    }
}
