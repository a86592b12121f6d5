//! Profiles compiled once at load: every field path any rule reads is interned into one field
//! table (so the decoder extracts each at most once per event), predicates are flattened into an
//! array of nodes evaluated without allocation, and each profile's session payload layout
//! (where its key, counters, aggregates and captured values live) is fixed here.
//!
//! `Rules` is immutable and shared by all shards; a reload compiles a new one and swaps it in.

use crate::config::{
    AggregateOp, Config, ConfigError, PredicateSpec, TimeMode, TsFormat, FIELDS_MAX,
};
use crate::decode::{Event, Field, FieldId, FieldTable, PATHS_MAX, SEGMENT_BYTES_MAX};
use std::sync::Arc;

// Every path a rule set may read must fit one field table.
const _: () = assert!(FIELDS_MAX <= PATHS_MAX);

/// Index of a profile in `Rules::profiles`; sub-session rules live in `Rules::subs`.
pub type ProfileId = u8;
pub type PredId = u32;

#[derive(Debug, Clone)]
enum Lit {
    Str(Box<[u8]>),
    Num(f64),
    Bool(bool),
}

impl Lit {
    #[inline(always)]
    fn matches(&self, f: &Field<'_>) -> bool {
        match (self, f) {
            (Lit::Str(s), Field::String { text, .. }) => short_eq(s, text),
            (Lit::Num(n), Field::Number(_)) => f.as_f64() == Some(*n),
            (Lit::Bool(b), Field::Bool(v)) => b == v,
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum CmpOp {
    Gt,
    Ge,
    Lt,
    Le,
}

#[derive(Debug, Clone)]
enum Node {
    Eq(FieldId, Lit),
    Ne(FieldId, Lit),
    /// Literals `lits[start..end]`.
    In(FieldId, u32, u32),
    Exists(FieldId, bool),
    Cmp(FieldId, CmpOp, f64),
    Prefix(FieldId, Box<[u8]>),
    /// Children `kids[start..end]`.
    All(u32, u32),
    Any(u32, u32),
    Not(PredId),
}

#[derive(Debug, Clone)]
pub struct Counter {
    pub name: String,
    pub when: Option<PredId>,
}

/// See [`ProfileRule::counters_by_value`].
#[derive(Debug, Clone)]
pub struct CountersByValue {
    pub field: FieldId,
    /// (counter, the string it counts), shortest strings first.
    pub eq: Box<[(usize, Box<[u8]>)]>,
    /// `eq[by_len[n]..by_len[n + 1]]` are the strings of `n` bytes; the last bucket holds every
    /// string of `LEN_BUCKETS - 1` bytes or more. A value is compared with the strings of its
    /// length only. Comparing it with every string branched on which one it was, and with
    /// event types in random order that branch missed about every other event.
    pub by_len: [usize; LEN_BUCKETS + 1],
    /// The counters of every event (no `when`).
    pub every: Box<[usize]>,
}

/// Buckets of [`CountersByValue::by_len`].
pub const LEN_BUCKETS: usize = 17;

impl CountersByValue {
    /// The counters whose string `value` may equal: those of its length.
    #[inline(always)]
    pub fn candidates(&self, value: &[u8]) -> &[(usize, Box<[u8]>)] {
        let b = value.len().min(LEN_BUCKETS - 1);
        &self.eq[self.by_len[b]..self.by_len[b + 1]]
    }
}

#[derive(Debug, Clone)]
pub struct Aggregate {
    pub name: String,
    pub field: FieldId,
    pub op: AggregateOp,
    pub when: Option<PredId>,
}

#[derive(Debug, Clone)]
pub struct ListRule {
    pub name: String,
    pub field: FieldId,
    pub max_len: u8,
    pub unique: bool,
    pub when: Option<PredId>,
}

#[derive(Debug, Clone)]
pub struct SubRule {
    pub name: String,
    pub key: Option<FieldId>,
    pub starts_when: Option<PredId>,
    pub ends_when: Option<PredId>,
    pub idle_timeout_ms: i64,
    pub counters: Vec<Counter>,
    /// Record profile id of this sub-session kind (after all top-level profiles).
    pub record_profile: ProfileId,
}

/// Byte offsets inside a session payload, after the key bytes (key length varies per session).
#[derive(Debug, Clone, Copy, Default)]
pub struct Layout {
    pub counters_off: usize,
    pub aggregates_off: usize,
    pub split_off: usize,
    pub subs_off: usize,
    /// u16 length of the variable area (captured values and lists), then the area itself.
    pub var_len_off: usize,
    pub fixed_bytes: usize,
}

#[derive(Debug, Clone)]
pub struct ProfileRule {
    pub name: String,
    pub match_: Option<PredId>,
    pub key: FieldId,
    pub time: TimeMode,
    pub timestamp: Option<(FieldId, TsFormat)>,
    pub allowed_lateness_ms: i64,
    pub idle_timeout_ms: i64,
    pub max_duration_ms: Option<i64>,
    pub starts_when: Option<PredId>,
    pub ends_when: Option<PredId>,
    pub split_on_change: Vec<FieldId>,
    pub metadata: Vec<FieldId>,
    pub state: Vec<FieldId>,
    pub counters: Vec<Counter>,
    pub aggregates: Vec<Aggregate>,
    pub lists: Vec<ListRule>,
    pub subs: Vec<SubRule>,
    /// Set when every counter with a `when` counts the events whose one same field equals a
    /// string (by event type, the usual case): the counters then read that field once an event.
    pub counters_by_value: Option<CountersByValue>,
    pub layout: Layout,
    /// Its markers' constant text (filled once all fields are known).
    pub text: super::markers::ProfileText,
}

/// The iterator of [`Rules::matching`]: a plain loop over the profiles, since it runs on every
/// event (built from `enumerate` and `filter_map`, it cost about 200 instructions an event for a
/// single profile).
pub struct Matching<'r, 'e> {
    rules: &'r Rules,
    ev: &'r Event<'e>,
    next: usize,
}

impl Iterator for Matching<'_, '_> {
    type Item = ProfileId;

    /// Always inlined: the replay's line loop called it out of line, twice a line (a match,
    /// then the end), and inlined the whole replay runs 1.5% faster (`bench/RESULTS.md`).
    #[inline(always)]
    fn next(&mut self) -> Option<ProfileId> {
        let profiles = &self.rules.profiles;
        while let Some(p) = profiles.get(self.next) {
            let i = self.next;
            self.next += 1;
            if p.match_.is_none_or(|m| self.rules.eval(m, self.ev)) {
                return Some(i as ProfileId);
            }
        }
        None
    }
}

#[derive(Debug, Clone)]
pub struct Rules {
    pub fields: Vec<String>,
    pub profiles: Vec<ProfileRule>,
    nodes: Vec<Node>,
    kids: Vec<PredId>,
    lits: Vec<Lit>,
    /// Sub-session slots reserved per session payload (for profiles with sub-sessions).
    pub subs_per_session_max: u32,
    pub key_bytes_max: u32,
    pub value_bytes_max: u32,
    /// The configuration text these rules were compiled from ([`Config::source`]).
    pub source: Arc<str>,
}

impl Rules {
    pub fn compile(cfg: &Config) -> Result<Rules, ConfigError> {
        let mut c = Compiler {
            rules: Rules {
                fields: Vec::new(),
                profiles: Vec::new(),
                nodes: Vec::new(),
                kids: Vec::new(),
                lits: Vec::new(),
                subs_per_session_max: cfg.limits.sub_sessions_per_session_max,
                key_bytes_max: cfg.limits.key_bytes_max,
                value_bytes_max: cfg.limits.value_bytes_max,
                source: cfg.source.as_str().into(),
            },
        };
        let top = cfg.profiles.len();
        let mut next_sub_id = top;
        for (i, p) in cfg.profiles.iter().enumerate() {
            let at = |k: &str| format!("profile[{i}] ({}).{k}", p.name);
            if p.time == TimeMode::Event && !p.sub_sessions.is_empty() {
                return Err(ConfigError {
                    key: at("sub_session"),
                    message: "sub-sessions are supported on processing-time profiles only; move them to a profile with time = \"processing\"".into(),
                });
            }
            let match_ = c.opt_pred(&at("match"), p.match_.as_ref())?;
            let key = c.field(&at("key"), &p.key)?;
            let timestamp = match &p.timestamp {
                Some(t) => Some((c.field(&at("timestamp.field"), &t.field)?, t.format)),
                None => None,
            };
            let starts_when = c.opt_pred(&at("starts_when"), p.starts_when.as_ref())?;
            let ends_when = c.opt_pred(&at("ends_when"), p.ends_when.as_ref())?;
            let split_on_change = c.fields(&at("split_on_change"), &p.split_on_change)?;
            let metadata = c.fields(&at("metadata"), &p.metadata)?;
            let state = c.fields(&at("state"), &p.state)?;
            let counters = c.counters(&at("counter"), &p.counters)?;
            let mut aggregates = Vec::new();
            for a in &p.aggregates {
                aggregates.push(Aggregate {
                    name: a.name.clone(),
                    field: c.field(&at("aggregate.field"), &a.field)?,
                    op: a.op,
                    when: c.opt_pred(&at("aggregate.when"), a.when.as_ref())?,
                });
            }
            let mut lists = Vec::new();
            for l in &p.lists {
                lists.push(ListRule {
                    name: l.name.clone(),
                    field: c.field(&at("list.field"), &l.field)?,
                    max_len: u8::try_from(l.max_len).unwrap_or(u8::MAX),
                    unique: l.unique,
                    when: c.opt_pred(&at("list.when"), l.when.as_ref())?,
                });
            }
            let mut subs = Vec::new();
            for s in &p.sub_sessions {
                let sat = |k: &str| format!("{}.sub_session ({}).{k}", at(""), s.name);
                subs.push(SubRule {
                    name: s.name.clone(),
                    key: match &s.key {
                        Some(k) => Some(c.field(&sat("key"), k)?),
                        None => None,
                    },
                    starts_when: c.opt_pred(&sat("starts_when"), s.starts_when.as_ref())?,
                    ends_when: c.opt_pred(&sat("ends_when"), s.ends_when.as_ref())?,
                    idle_timeout_ms: s.idle_timeout.unwrap_or(p.idle_timeout).as_ms(),
                    counters: c.counters(&sat("counter"), &s.counters)?,
                    record_profile: next_sub_id as ProfileId,
                });
                next_sub_id += 1;
            }
            for (kind, names) in [
                (
                    "counter",
                    counters.iter().map(|x| &x.name).collect::<Vec<_>>(),
                ),
                ("aggregate", aggregates.iter().map(|x| &x.name).collect()),
                ("list", lists.iter().map(|x| &x.name).collect()),
                ("sub_session", subs.iter().map(|x| &x.name).collect()),
            ] {
                if let Some(name) = repeated(names) {
                    return Err(ConfigError {
                        key: at(&format!("{kind}.name")),
                        message: format!(
                            "`{name}` is used twice in this profile; names must be unique"
                        ),
                    });
                }
            }
            // Each captured field is one member of its object in the markers: listed twice, it
            // would be written twice, and JSON readers keep only one of them.
            for (kind, fields) in [("metadata", &p.metadata), ("state", &p.state)] {
                if let Some(field) = repeated(fields.iter().collect()) {
                    return Err(ConfigError {
                        key: at(kind),
                        message: format!("`{field}` is listed twice; list each field once"),
                    });
                }
            }
            let layout = layout_for(
                counters.len(),
                aggregates.len(),
                split_on_change.len(),
                if subs.is_empty() {
                    0
                } else {
                    cfg.limits.sub_sessions_per_session_max as usize
                },
            );
            c.rules.profiles.push(ProfileRule {
                name: p.name.clone(),
                match_,
                key,
                time: p.time,
                timestamp,
                allowed_lateness_ms: p.allowed_lateness.map(|d| d.as_ms()).unwrap_or(0),
                idle_timeout_ms: p.idle_timeout.as_ms(),
                max_duration_ms: p.max_duration.map(|d| d.as_ms()),
                starts_when,
                ends_when,
                split_on_change,
                metadata,
                state,
                counters,
                aggregates,
                lists,
                subs,
                counters_by_value: None,
                layout,
                text: Default::default(),
            });
        }
        let mut rules = c.rules;
        for i in 0..rules.profiles.len() {
            rules.profiles[i].text =
                super::markers::ProfileText::new(&rules.profiles[i], &rules.fields);
            rules.profiles[i].counters_by_value = rules.counters_by_value(&rules.profiles[i]);
        }
        Ok(rules)
    }

    /// [`ProfileRule::counters_by_value`] for `rule`, when its counters allow it.
    fn counters_by_value(&self, rule: &ProfileRule) -> Option<CountersByValue> {
        let (mut field, mut eq, mut every) = (None, Vec::new(), Vec::new());
        for (i, c) in rule.counters.iter().enumerate() {
            let Some(when) = c.when else {
                every.push(i);
                continue;
            };
            let Node::Eq(f, Lit::Str(text)) = &self.nodes[when as usize] else {
                return None;
            };
            if *field.get_or_insert(*f) != *f {
                return None;
            }
            eq.push((i, text.clone()));
        }
        let bucket = |text: &[u8]| text.len().min(LEN_BUCKETS - 1);
        eq.sort_by_key(|(_, text)| bucket(text));
        let by_len = std::array::from_fn(|b| eq.partition_point(|(_, text)| bucket(text) < b));
        Some(CountersByValue {
            field: field?,
            eq: eq.into_boxed_slice(),
            by_len,
            every: every.into_boxed_slice(),
        })
    }

    pub fn field_table(&self) -> FieldTable {
        FieldTable::new(&self.fields).expect("field paths were validated at compile time")
    }

    /// Profiles whose `match` accepts the event, in configuration order.
    pub fn matching<'r, 'e>(&'r self, ev: &'r Event<'e>) -> Matching<'r, 'e> {
        Matching {
            rules: self,
            ev,
            next: 0,
        }
    }

    /// Whether predicate `id` holds for `ev`. A string `eq`, by far the most common leaf
    /// (counters and `ends_when` on an event type), and `exists`, the usual profile `match`,
    /// are decided here, inlined into the caller; everything else goes through the recursive
    /// `eval_node`, whose call costs more than the comparison itself.
    #[inline(always)]
    pub fn eval(&self, id: PredId, ev: &Event<'_>) -> bool {
        match &self.nodes[id as usize] {
            Node::Eq(f, lit @ Lit::Str(_)) => lit.matches(&ev.get(*f)),
            Node::Exists(f, want) => ev.has(*f) == *want,
            _ => self.eval_node(id, ev),
        }
    }

    #[inline(never)]
    fn eval_node(&self, id: PredId, ev: &Event<'_>) -> bool {
        match &self.nodes[id as usize] {
            Node::Eq(f, lit) => lit.matches(&ev.get(*f)),
            Node::Ne(f, lit) => !lit.matches(&ev.get(*f)),
            Node::In(f, a, b) => {
                let v = ev.get(*f);
                self.lits[*a as usize..*b as usize]
                    .iter()
                    .any(|l| l.matches(&v))
            }
            Node::Exists(f, want) => ev.has(*f) == *want,
            Node::Cmp(f, op, x) => match ev.get(*f).as_f64() {
                None => false,
                Some(v) => match op {
                    CmpOp::Gt => v > *x,
                    CmpOp::Ge => v >= *x,
                    CmpOp::Lt => v < *x,
                    CmpOp::Le => v <= *x,
                },
            },
            Node::Prefix(f, p) => match ev.get(*f) {
                Field::String { text, .. } => text.starts_with(p),
                _ => false,
            },
            Node::All(a, b) => self.kids[*a as usize..*b as usize]
                .iter()
                .all(|&k| self.eval(k, ev)),
            Node::Any(a, b) => self.kids[*a as usize..*b as usize]
                .iter()
                .any(|&k| self.eval(k, ev)),
            Node::Not(k) => !self.eval(*k, ev),
        }
    }

    /// [`Rules::eval`] that remembers, in `last`, the text of the field a string `eq` read, and
    /// reuses it for the next string `eq` on the same field: an event's counters and its
    /// `ends_when` usually all test one field (the event type), and looking a field up costs
    /// more than comparing it.
    #[inline(always)]
    pub fn eval_reusing<'e>(&self, id: PredId, ev: &Event<'e>, last: &mut LastField<'e>) -> bool {
        match &self.nodes[id as usize] {
            Node::Eq(f, Lit::Str(lit)) => last.text(*f, ev).is_some_and(|text| short_eq(lit, text)),
            _ => self.eval_node(id, ev),
        }
    }

    /// A `match` rather than `Option::is_some_and`, which the compiler left as a call in the
    /// event path (more instructions than the comparison it wraps).
    #[inline(always)]
    pub fn eval_opt(&self, id: Option<PredId>, ev: &Event<'_>) -> bool {
        match id {
            Some(p) => self.eval(p, ev),
            None => false,
        }
    }

    /// Every profile id (top-level and sub-session) -> its display name.
    pub fn record_profile_count(&self) -> usize {
        self.profiles.len() + self.profiles.iter().map(|p| p.subs.len()).sum::<usize>()
    }
}

/// The string text of one field of one event, kept by [`Rules::eval_reusing`].
#[derive(Clone, Copy, Debug)]
pub struct LastField<'e> {
    /// `FieldId::MAX`: nothing kept yet.
    field: FieldId,
    /// The field's text when it is a string.
    text: Option<&'e [u8]>,
}

impl<'e> LastField<'e> {
    pub const NONE: Self = LastField {
        field: FieldId::MAX,
        text: None,
    };

    /// Field `f`'s text when it is a string, looked up unless `f` is the field kept.
    #[inline(always)]
    pub fn text(&mut self, f: FieldId, ev: &Event<'e>) -> Option<&'e [u8]> {
        if self.field != f {
            *self = LastField {
                field: f,
                text: ev.string(f),
            };
        }
        self.text
    }
}

/// `a == b` for the short strings predicates compare (event types, flags), without a call to
/// `memcmp`: two overlapping word loads cover 4 to 16 bytes.
#[inline(always)]
pub(crate) fn short_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    let word8 = |x: &[u8], at: usize| u64::from_le_bytes(x[at..at + 8].try_into().unwrap());
    let word4 = |x: &[u8], at: usize| u32::from_le_bytes(x[at..at + 4].try_into().unwrap());
    match n {
        8..=16 => word8(a, 0) == word8(b, 0) && word8(a, n - 8) == word8(b, n - 8),
        4..=7 => word4(a, 0) == word4(b, 0) && word4(a, n - 4) == word4(b, n - 4),
        _ => a == b,
    }
}

/// The latest timestamp accepted: 9999-12-31T23:59:59.999Z, in epoch milliseconds.
const MS_MAX: i64 = 253_402_300_799_999;

/// The timestamp in field `f` of `ev` in epoch milliseconds, or None when missing, of the wrong
/// type or out of range. Integer epoch milliseconds, the common form, are read inline from the
/// number's text (no match over every kind of field, see [`Event::number`]); the rest in
/// `timestamp_ms_any`.
#[inline(always)]
pub fn event_timestamp_ms(ev: &Event<'_>, f: FieldId, format: TsFormat) -> Option<i64> {
    if format == TsFormat::EpochMs {
        if let Some(v) = ev.number(f).and_then(epoch_ms_integer) {
            return Some(v);
        }
    }
    timestamp_ms_any(ev.get(f), format)
}

/// A number's text as integer epoch milliseconds in range; None leaves it to `timestamp_ms_any`
/// (which gives None for an integer out of range too).
#[inline(always)]
fn epoch_ms_integer(text: &[u8]) -> Option<i64> {
    crate::decode::integer(text).filter(|v| (0..=MS_MAX).contains(v))
}

#[inline(never)]
fn timestamp_ms_any(f: Field<'_>, format: TsFormat) -> Option<i64> {
    let scaled = |x: f64, mult: f64| {
        let ms = (x * mult).floor();
        (0.0..=MS_MAX as f64).contains(&ms).then_some(ms as i64)
    };
    match format {
        TsFormat::EpochMs => match f.as_i64() {
            Some(v) if (0..=MS_MAX).contains(&v) => Some(v),
            Some(_) => None,
            None => scaled(f.as_f64()?, 1.0),
        },
        TsFormat::EpochS => scaled(f.as_f64()?, 1000.0),
        TsFormat::EpochUs => scaled(f.as_f64()?, 0.001),
        TsFormat::Rfc3339 => match f {
            Field::String { text, .. } => {
                let t: jiff::Timestamp = std::str::from_utf8(text).ok()?.parse().ok()?;
                Some(t.as_millisecond()).filter(|ms| (0..=MS_MAX).contains(ms))
            }
            _ => None,
        },
    }
}

/// The first of `names`, in sorted order, that occurs more than once.
fn repeated(mut names: Vec<&String>) -> Option<&String> {
    names.sort();
    names.windows(2).find(|w| w[0] == w[1]).map(|w| w[0])
}

pub fn layout_for(counters: usize, aggregates: usize, splits: usize, subs: usize) -> Layout {
    let counters_off = 0;
    let aggregates_off = counters_off + 4 * counters;
    let split_off = aggregates_off + 8 * aggregates;
    let subs_off = split_off + 8 * splits;
    let var_len_off = subs_off + 4 * subs;
    Layout {
        counters_off,
        aggregates_off,
        split_off,
        subs_off,
        var_len_off,
        fixed_bytes: var_len_off + 2,
    }
}

struct Compiler {
    rules: Rules,
}

impl Compiler {
    fn field(&mut self, key: &str, path: &str) -> Result<FieldId, ConfigError> {
        if let Some(i) = self.rules.fields.iter().position(|p| p == path) {
            return Ok(i as FieldId);
        }
        if path.is_empty() || path.split('.').any(|s| s.is_empty()) {
            return Err(ConfigError {
                key: key.into(),
                message: format!(
                    "`{path}` is not a field path; write e.g. \"user\" or \"ctx.device.id\""
                ),
            });
        }
        // The decoder's field table takes no longer key segment, and `field_table` expects
        // every compiled path to fit it.
        if let Some(seg) = path.split('.').find(|s| s.len() > SEGMENT_BYTES_MAX) {
            return Err(ConfigError {
                key: key.into(),
                message: format!(
                    "`{path}` has a key segment of {} bytes; the limit is {SEGMENT_BYTES_MAX}",
                    seg.len()
                ),
            });
        }
        if self.rules.fields.len() >= FIELDS_MAX {
            return Err(ConfigError {
                key: key.into(),
                message: format!("`{path}` would be field number {}; all rules together may read at most {FIELDS_MAX} distinct fields", FIELDS_MAX + 1),
            });
        }
        self.rules.fields.push(path.to_string());
        Ok((self.rules.fields.len() - 1) as FieldId)
    }

    fn fields(&mut self, key: &str, paths: &[String]) -> Result<Vec<FieldId>, ConfigError> {
        paths.iter().map(|p| self.field(key, p)).collect()
    }

    fn counters(
        &mut self,
        key: &str,
        specs: &[crate::config::CounterSpec],
    ) -> Result<Vec<Counter>, ConfigError> {
        specs
            .iter()
            .map(|s| {
                Ok(Counter {
                    name: s.name.clone(),
                    when: self.opt_pred(&format!("{key}.when"), s.when.as_ref())?,
                })
            })
            .collect()
    }

    fn opt_pred(
        &mut self,
        key: &str,
        p: Option<&PredicateSpec>,
    ) -> Result<Option<PredId>, ConfigError> {
        p.map(|p| self.pred(key, p, 0)).transpose()
    }

    fn pred(&mut self, key: &str, p: &PredicateSpec, depth: u32) -> Result<PredId, ConfigError> {
        let bad = |m: String| ConfigError {
            key: key.into(),
            message: m,
        };
        if depth > 16 {
            return Err(bad("predicates nest deeper than 16 levels".into()));
        }
        let ops = [
            p.eq.is_some(),
            p.ne.is_some(),
            p.in_.is_some(),
            p.exists.is_some(),
            p.gt.is_some(),
            p.ge.is_some(),
            p.lt.is_some(),
            p.le.is_some(),
            p.prefix.is_some(),
            p.all.is_some(),
            p.any.is_some(),
            p.not.is_some(),
        ]
        .iter()
        .filter(|&&b| b)
        .count();
        if ops != 1 {
            return Err(bad(format!(
                "{ops} operators in one predicate; write exactly one of eq, ne, in, exists, gt, ge, lt, le, prefix, all, any, not (combine with all = [..])"
            )));
        }
        let combinator = p.all.is_some() || p.any.is_some() || p.not.is_some();
        let field = match (&p.field, combinator) {
            (Some(_), true) => {
                return Err(bad(
                    "`field` is not allowed beside all/any/not; put it in the inner predicates"
                        .into(),
                ))
            }
            (None, false) => {
                return Err(bad(
                    "missing `field`; e.g. { field = \"type\", eq = \"click\" }".into(),
                ))
            }
            (Some(f), false) => Some(self.field(key, f)?),
            (None, true) => None,
        };
        let node = if let Some(list) = p.all.as_ref().or(p.any.as_ref()) {
            if list.is_empty() {
                return Err(bad(
                    "an empty all/any list; give it at least one predicate".into()
                ));
            }
            let ids = list
                .iter()
                .map(|q| self.pred(key, q, depth + 1))
                .collect::<Result<Vec<_>, _>>()?;
            let a = self.rules.kids.len() as u32;
            self.rules.kids.extend(ids);
            let b = self.rules.kids.len() as u32;
            if p.all.is_some() {
                Node::All(a, b)
            } else {
                Node::Any(a, b)
            }
        } else if let Some(q) = &p.not {
            Node::Not(self.pred(key, q, depth + 1)?)
        } else {
            let f = field.expect("leaf predicates have a field");
            if let Some(v) = &p.eq {
                Node::Eq(f, lit(key, v)?)
            } else if let Some(v) = &p.ne {
                Node::Ne(f, lit(key, v)?)
            } else if let Some(vs) = &p.in_ {
                let a = self.rules.lits.len() as u32;
                for v in vs {
                    let l = lit(key, v)?;
                    self.rules.lits.push(l);
                }
                Node::In(f, a, self.rules.lits.len() as u32)
            } else if let Some(e) = p.exists {
                Node::Exists(f, e)
            } else if let Some(x) = p.gt {
                Node::Cmp(f, CmpOp::Gt, x)
            } else if let Some(x) = p.ge {
                Node::Cmp(f, CmpOp::Ge, x)
            } else if let Some(x) = p.lt {
                Node::Cmp(f, CmpOp::Lt, x)
            } else if let Some(x) = p.le {
                Node::Cmp(f, CmpOp::Le, x)
            } else {
                let pre = p.prefix.as_ref().expect("one operator is set");
                Node::Prefix(f, pre.as_bytes().into())
            }
        };
        self.rules.nodes.push(node);
        Ok((self.rules.nodes.len() - 1) as PredId)
    }
}

fn lit(key: &str, v: &toml::Value) -> Result<Lit, ConfigError> {
    match v {
        toml::Value::String(s) => Ok(Lit::Str(s.as_bytes().into())),
        toml::Value::Integer(i) => Ok(Lit::Num(*i as f64)),
        toml::Value::Float(f) => Ok(Lit::Num(*f)),
        toml::Value::Boolean(b) => Ok(Lit::Bool(*b)),
        other => Err(ConfigError {
            key: key.into(),
            message: format!("literal {other} must be a string, number or boolean"),
        }),
    }
}

#[cfg(test)]
mod short_eq_tests {
    use super::short_eq;

    /// Against `==` for every length up to 20 and a difference at every position.
    #[test]
    fn agrees_with_slice_eq() {
        for n in 0..=20usize {
            let a: Vec<u8> = (0..n as u8).map(|i| b'a' + i).collect();
            assert!(short_eq(&a, &a.clone()), "len {n}");
            for m in 0..=20usize {
                let b: Vec<u8> = (0..m as u8).map(|i| b'a' + i).collect();
                assert_eq!(short_eq(&a, &b), a == b, "{n} vs {m}");
            }
            for at in 0..n {
                let mut b = a.clone();
                b[at] ^= 0x20;
                assert!(!short_eq(&a, &b), "len {n}, differs at {at}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counters read their field once an event only when every `when` is a string `eq` on that
    /// one field; any other counter keeps them on the predicates.
    #[test]
    fn counters_by_value_only_for_string_eq_on_one_field() {
        let compile = |counters: &str| {
            let cfg = Config::from_toml(&format!(
                "[[profile]]\nname = \"p\"\nkey = \"user\"\nidle_timeout = \"1m\"\n{counters}"
            ))
            .unwrap();
            let rules = Rules::compile(&cfg).unwrap();
            rules.profiles[0].counters_by_value.clone().map(|by| {
                let eq: Vec<_> = by
                    .eq
                    .iter()
                    .map(|(i, t)| (*i, String::from_utf8(t.to_vec()).unwrap()))
                    .collect();
                (
                    rules.fields[usize::from(by.field)].clone(),
                    eq,
                    by.every.to_vec(),
                )
            })
        };
        let counter = |name: &str, when: &str| {
            let when = if when.is_empty() {
                String::new()
            } else {
                format!("when = {when}\n")
            };
            format!("[[profile.counter]]\nname = \"{name}\"\n{when}")
        };
        let by_type = counter("clicks", r#"{ field = "type", eq = "click" }"#)
            + &counter("all", "")
            + &counter("pages", r#"{ field = "type", eq = "page" }"#);
        assert_eq!(
            compile(&by_type),
            Some((
                "type".to_string(),
                vec![(2, "page".to_string()), (0, "click".to_string())],
                vec![1]
            ))
        );
        for other in [
            r#"{ field = "kind", eq = "a" }"#,
            r#"{ field = "type", eq = 1 }"#,
            r#"{ field = "type", ne = "click" }"#,
            r#"{ field = "type", in = ["click"] }"#,
            r#"{ all = [{ field = "type", eq = "click" }] }"#,
        ] {
            assert_eq!(
                compile(&(by_type.clone() + &counter("x", other))),
                None,
                "{other}"
            );
        }
        assert_eq!(compile(""), None, "no counters");
        assert_eq!(compile(&counter("all", "")), None, "no field to read");
    }

    /// A value's candidates are the counters' strings of its length, every one of them, the
    /// strings of 16 bytes and more sharing the last bucket.
    #[test]
    fn counters_by_value_candidates_are_the_strings_of_the_values_length() {
        let texts = [
            "click",
            "",
            "page",
            "a",
            "scroll",
            "view",
            "0123456789abcdef",
            "0123456789abcdefg",
            "purchase_completed_with_coupon",
            "click",
        ];
        let mut toml =
            "[[profile]]\nname = \"p\"\nkey = \"user\"\nidle_timeout = \"1m\"\n".to_string();
        for (i, t) in texts.iter().enumerate() {
            toml += &format!(
                "[[profile.counter]]\nname = \"c{i}\"\nwhen = {{ field = \"type\", eq = \"{t}\" }}\n"
            );
        }
        let rules = Rules::compile(&Config::from_toml(&toml).unwrap()).unwrap();
        let by = rules.profiles[0].counters_by_value.clone().unwrap();
        assert_eq!(by.eq.len(), texts.len());
        let probes = texts
            .iter()
            .copied()
            .chain(["clock", "pag", "x", "0123456789abcdeX"]);
        for v in probes {
            let mut found: Vec<usize> = by
                .candidates(v.as_bytes())
                .iter()
                .filter(|(_, t)| short_eq(t, v.as_bytes()))
                .map(|(i, _)| *i)
                .collect();
            found.sort_unstable();
            let want: Vec<usize> = (0..texts.len()).filter(|&i| texts[i] == v).collect();
            assert_eq!(found, want, "{v:?}");
            let bucket = |n: usize| n.min(LEN_BUCKETS - 1);
            for (_, t) in by.candidates(v.as_bytes()) {
                assert_eq!(bucket(t.len()), bucket(v.len()), "{v:?}");
            }
        }
    }

    /// Reusing a field's text across predicates decides as evaluating each on its own does,
    /// whatever the order of fields and the kinds of their values.
    #[test]
    fn eval_reusing_agrees_with_eval() {
        let cfg = Config::from_toml(
            r#"
[[profile]]
name = "p"
key = "user"
idle_timeout = "1m"
ends_when = { field = "type", eq = "logout" }

[[profile.counter]]
name = "clicks"
when = { field = "type", eq = "click" }

[[profile.counter]]
name = "a"
when = { field = "kind", eq = "a" }

[[profile.counter]]
name = "pages"
when = { field = "type", eq = "page" }

[[profile.counter]]
name = "typed"
when = { field = "type", exists = true }

[[profile.counter]]
name = "one"
when = { field = "type", eq = 1 }
"#,
        )
        .unwrap();
        let rules = Rules::compile(&cfg).unwrap();
        let p = &rules.profiles[0];
        let preds: Vec<PredId> = p
            .counters
            .iter()
            .filter_map(|c| c.when)
            .chain(p.ends_when)
            .collect();
        let mut dec = crate::decode::Decoder::new(rules.field_table(), 8, 4096);
        for line in [
            r#"{"user":"u","type":"click","kind":"a"}"#,
            r#"{"user":"u","type":"page"}"#,
            r#"{"user":"u","type":"logout","kind":"b"}"#,
            r#"{"user":"u","kind":"a"}"#,
            r#"{"user":"u","type":1,"kind":"a"}"#,
            r#"{"user":"u","type":"click"}"#,
            r#"{"user":"u","type":null}"#,
        ] {
            let ev = dec.decode(line.as_bytes()).unwrap();
            for start in 0..preds.len() {
                let mut last = LastField::NONE;
                for &id in preds[start..].iter().chain(&preds[..start]) {
                    assert_eq!(
                        rules.eval_reusing(id, &ev, &mut last),
                        rules.eval(id, &ev),
                        "{line} pred {id}"
                    );
                }
            }
        }
    }

    /// An event's timestamp read from the number's text as from its field, in every format
    /// and for every kind of value.
    #[test]
    fn event_timestamp_read_as_from_the_field() {
        let cfg = Config::from_toml(
            "[[profile]]\nname = \"p\"\nkey = \"user\"\nidle_timeout = \"1m\"\n\
             time = \"event\"\ntimestamp = { field = \"ts\", format = \"epoch_ms\" }\n",
        )
        .unwrap();
        let rules = Rules::compile(&cfg).unwrap();
        let (f, _) = rules.profiles[0].timestamp.unwrap();
        let mut dec = crate::decode::Decoder::new(rules.field_table(), 8, 4096);
        let values = [
            "1750000000000",
            "-1750000000000",
            "0",
            "1",
            "253402300799999",
            "253402300800000",
            "99999999999999999999",
            "1750000000000.5",
            "1.75e12",
            "-0",
            "\"1750000000000\"",
            "\"2025-06-15T12:00:00Z\"",
            "null",
            "true",
            "{\"a\":1}",
            "[1750000000000]",
        ];
        let formats = [
            TsFormat::EpochMs,
            TsFormat::EpochS,
            TsFormat::EpochUs,
            TsFormat::Rfc3339,
        ];
        for v in values {
            let line = format!(r#"{{"user":"u","ts":{v}}}"#);
            let ev = dec.decode(line.as_bytes()).unwrap();
            for format in formats {
                assert_eq!(
                    event_timestamp_ms(&ev, f, format),
                    timestamp_ms_any(ev.get(f), format),
                    "{line} {format:?}"
                );
            }
        }
        let ev = dec.decode(br#"{"user":"u"}"#).unwrap();
        assert_eq!(event_timestamp_ms(&ev, f, TsFormat::EpochMs), None);
    }

    /// RFC 3339 times with their offsets, fractions and the forms the RFC allows, and what it
    /// does not (a time without an offset is not an instant; trailing text is not a time).
    #[test]
    fn rfc3339_timestamps_keep_their_offsets() {
        let cfg = crate::config::Config::from_toml(
            "[[profile]]\nname = \"w\"\nkey = \"user\"\ntime = \"event\"\ntimestamp = { field = \"ts\", format = \"rfc3339\" }\nidle_timeout = \"1m\"\n",
        )
        .unwrap();
        let rules = Rules::compile(&cfg).unwrap();
        let (f, fmt) = rules.profiles[0].timestamp.unwrap();
        let mut dec = crate::decode::Decoder::new(rules.field_table(), 8, 4096);
        let mut at = |text: &str| {
            let line = format!(r#"{{"user":"u","ts":"{text}"}}"#);
            event_timestamp_ms(&dec.decode(line.as_bytes()).unwrap(), f, fmt)
        };
        let t = 1_700_000_000_000;
        for (text, want) in [
            ("2023-11-14T22:13:20Z", Some(t)),
            ("2023-11-14T22:13:20.123Z", Some(t + 123)),
            ("2023-11-14T22:13:20.1239Z", Some(t + 123)),
            ("2023-11-14t22:13:20z", Some(t)),
            ("2023-11-14 22:13:20Z", Some(t)),
            ("2023-11-14T23:13:20+01:00", Some(t)),
            ("2023-11-14T23:13:20.000+01:00", Some(t)),
            ("2023-11-15T03:43:20+05:30", Some(t)),
            ("2023-11-14T17:13:20-05:00", Some(t)),
            ("2023-11-14T22:13:20", None),
            ("2023-11-14T22:13:20Zjunk", None),
            ("2023-11-14", None),
            ("1969-12-31T23:59:59Z", None),
            ("not a time", None),
        ] {
            assert_eq!(at(text), want, "{text}");
        }
    }

    /// The word-at-a-time epoch-millisecond reading against the general one, and the decoder's
    /// integer read (whose eight-digit words it is) against the standard library's parse.
    #[test]
    fn epoch_ms_digits_read_as_the_general_path_does() {
        let mut texts: Vec<String> = [
            "0",
            "-1",
            "123456789",
            "1750000000000",
            "0000000001",
            "253402300799999",
            "253402300800000",
            "9999999999999999",
            "1750000000000.5",
            "1.75e12",
            "-1750000000000",
            "12345678a",
            "1234567890123/",
            "12345678901234567",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let digits = 9 + (x % 8) as u32;
            texts.push(format!("{}", x % 10u64.pow(digits)));
            let mut bad = format!("{:016}", x % 10u64.pow(16)).into_bytes();
            let at = (x >> 40) as usize % bad.len();
            bad[at] = [b'/', b':', b'.', b'e', b'-', 0x80][(x >> 50) as usize % 6];
            texts.push(String::from_utf8_lossy(&bad[..digits as usize]).into_owned());
        }
        for t in &texts {
            let f = Field::Number(t.as_bytes());
            let general = timestamp_ms_any(f, TsFormat::EpochMs);
            assert_eq!(epoch_ms_integer(t.as_bytes()).or(general), general, "{t}");
            assert_eq!(f.as_i64(), t.parse::<i64>().ok(), "{t}");
        }
    }
}
