//! Inventory files for `bmctl import --file`: CSV with a header row, a JSON array, or JSON
//! Lines. Each row keeps the line it came from, so that errors (local or from the server)
//! point at the line to fix.

use std::collections::HashMap;

use bm_proto::v1 as pb;
use serde::Deserialize;

/// A row that parsed, with the line it starts on.
#[derive(Debug)]
pub(crate) struct Row {
    pub(crate) line: usize,
    pub(crate) machine: pb::Machine,
}

/// A row that did not parse.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct RowError {
    pub(crate) line: usize,
    pub(crate) message: String,
}

/// The columns of a CSV inventory (the header may list them in any order; `id` and
/// `provider` are required).
const COLUMNS: [&str; 9] = [
    "id",
    "provider",
    "mac_addresses",
    "ssh_endpoint",
    "bmc_endpoint",
    "image",
    "target_cluster",
    "network_config",
    "labels",
];

/// One inventory entry, as JSON writes it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Entry {
    id: String,
    provider: String,
    #[serde(deserialize_with = "one_or_many")]
    mac_addresses: Vec<String>,
    ssh_endpoint: String,
    bmc_endpoint: String,
    image: String,
    target_cluster: String,
    network_config: String,
    labels: HashMap<String, String>,
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => split_list(&s),
        OneOrMany::Many(v) => v,
    })
}

fn split_list(s: &str) -> Vec<String> {
    s.split([';', ',', ' '])
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(str::to_owned)
        .collect()
}

impl Entry {
    fn into_machine(self) -> pb::Machine {
        pb::Machine {
            id: self.id,
            spec: Some(pb::MachineSpec {
                provider: self.provider,
                mac_addresses: self.mac_addresses,
                ssh_endpoint: self.ssh_endpoint,
                bmc_endpoint: self.bmc_endpoint,
                image: self.image,
                target_cluster: self.target_cluster,
                network_config: self.network_config,
            }),
            labels: self.labels,
            ..Default::default()
        }
    }
}

/// Parses an inventory; `name` picks the format by extension (`.csv`, `.json`, `.jsonl`,
/// `.ndjson`), otherwise by the first non-blank character.
pub(crate) fn parse(name: &str, text: &str) -> Result<(Vec<Row>, Vec<RowError>), String> {
    let lower = name.to_lowercase();
    if lower.ends_with(".csv") {
        return parse_csv(text);
    }
    if lower.ends_with(".jsonl") || lower.ends_with(".ndjson") {
        return Ok(parse_json_lines(text));
    }
    match text.trim_start().chars().next() {
        Some('[') => parse_json_array(text),
        Some('{') => Ok(parse_json_lines(text)),
        _ if lower.ends_with(".json") => {
            Err("a JSON inventory must be an array of machines or one machine per line".into())
        }
        _ => parse_csv(text),
    }
}

fn parse_csv(text: &str) -> Result<(Vec<Row>, Vec<RowError>), String> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .flexible(true)
        .comment(Some(b'#'))
        .from_reader(text.as_bytes());
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| format!("line 1: cannot read the header: {e}"))?
        .iter()
        .map(|h| h.to_lowercase())
        .collect();
    for h in &header {
        if !COLUMNS.contains(&h.as_str()) {
            return Err(format!(
                "line 1: unknown column {h:?}; the columns are {}",
                COLUMNS.join(", ")
            ));
        }
    }
    for required in ["id", "provider"] {
        if !header.iter().any(|h| h == required) {
            return Err(format!("line 1: the header has no {required:?} column"));
        }
    }
    // The reader's positions ignore comment lines (a record's position is where the
    // comments before it begin), so count lines from the byte offset, past any comments.
    // Records come in file order: the count goes on from the previous record's start.
    let mut cursor = (0usize, 1usize); // (byte, line)
    let mut line_at = |byte: u64| {
        let mut start = usize::try_from(byte).unwrap_or(usize::MAX).min(text.len());
        loop {
            // Line ends (a CRLF file puts the offset on the previous line's \n) and comments.
            let rest = &text[start..];
            start += rest.len() - rest.trim_start_matches(['\r', '\n']).len();
            if !text[start..].starts_with('#') {
                break;
            }
            match text[start..].find('\n') {
                Some(i) => start += i + 1,
                None => break,
            }
        }
        if start < cursor.0 {
            cursor = (0, 1);
        }
        cursor.1 += text.as_bytes()[cursor.0..start]
            .iter()
            .filter(|b| **b == b'\n')
            .count();
        cursor.0 = start;
        cursor.1
    };
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    for record in reader.records() {
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                let line = e.position().map_or(0, |p| line_at(p.byte()));
                errors.push(RowError {
                    line,
                    message: e.to_string(),
                });
                continue;
            }
        };
        let line = record.position().map_or(0, |p| line_at(p.byte()));
        if record.len() != header.len() {
            errors.push(RowError {
                line,
                message: format!(
                    "{} fields, but the header has {}",
                    record.len(),
                    header.len()
                ),
            });
            continue;
        }
        let mut entry = Entry::default();
        let mut bad = None;
        for (h, v) in header.iter().zip(record.iter()) {
            match h.as_str() {
                "id" => entry.id = v.to_owned(),
                "provider" => entry.provider = v.to_owned(),
                "mac_addresses" => entry.mac_addresses = split_list(v),
                "ssh_endpoint" => entry.ssh_endpoint = v.to_owned(),
                "bmc_endpoint" => entry.bmc_endpoint = v.to_owned(),
                "image" => entry.image = v.to_owned(),
                "target_cluster" => entry.target_cluster = v.to_owned(),
                "network_config" => entry.network_config = v.to_owned(),
                "labels" => {
                    for pair in v.split(';').map(str::trim).filter(|p| !p.is_empty()) {
                        match pair.split_once('=') {
                            Some((k, val)) => {
                                entry
                                    .labels
                                    .insert(k.trim().to_owned(), val.trim().to_owned());
                            }
                            None => bad = Some(format!("label {pair:?} is not key=value")),
                        }
                    }
                }
                _ => {}
            }
        }
        match bad {
            Some(message) => errors.push(RowError { line, message }),
            None => rows.push(Row {
                line,
                machine: entry.into_machine(),
            }),
        }
    }
    Ok((rows, errors))
}

/// One machine of a JSON inventory: a flat entry (`{"id", "provider", "mac_addresses", ...}`)
/// or a Machine as `bmctl -o json list` prints it (`{"id", "spec": {...}, "labels", ...}`),
/// whose status is left out: the server owns it.
fn machine_from_json(v: serde_json::Value) -> Result<pb::Machine, String> {
    if v.get("spec").is_some() {
        let mut m: pb::Machine = serde_json::from_value(v).map_err(|e| e.to_string())?;
        m.status = None;
        m.effective_state = 0;
        m.create_time = None;
        m.update_time = None;
        Ok(m)
    } else {
        serde_json::from_value::<Entry>(v)
            .map(Entry::into_machine)
            .map_err(|e| e.to_string())
    }
}

fn parse_json_lines(text: &str) -> (Vec<Row>, Vec<RowError>) {
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    for (i, l) in text.lines().enumerate() {
        let l = l.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        match serde_json::from_str::<serde_json::Value>(l)
            .map_err(|e| e.to_string())
            .and_then(machine_from_json)
        {
            Ok(machine) => rows.push(Row {
                line: i + 1,
                machine,
            }),
            Err(message) => errors.push(RowError {
                line: i + 1,
                message,
            }),
        }
    }
    (rows, errors)
}

/// The line on which each element of a top-level JSON array starts.
fn element_lines(text: &str) -> Vec<usize> {
    let (mut line, mut depth, mut in_str, mut esc) = (1, 0, false, false);
    let mut starts = Vec::new();
    let mut expecting = false;
    for c in text.chars() {
        if in_str {
            match (esc, c) {
                (true, _) => esc = false,
                (false, '\\') => esc = true,
                (false, '"') => in_str = false,
                _ => {}
            }
            if c == '\n' {
                line += 1;
            }
            continue;
        }
        match c {
            '\n' => line += 1,
            '[' | '{' => {
                if depth == 1 && expecting {
                    starts.push(line);
                    expecting = false;
                }
                depth += 1;
                if depth == 1 {
                    expecting = true;
                }
            }
            ']' | '}' => depth -= 1,
            ',' if depth == 1 => expecting = true,
            c if depth == 1 && expecting && !c.is_whitespace() => {
                starts.push(line);
                expecting = false;
                if c == '"' {
                    in_str = true;
                }
            }
            '"' => in_str = true,
            _ => {}
        }
    }
    starts
}

fn parse_json_array(text: &str) -> Result<(Vec<Row>, Vec<RowError>), String> {
    let values: Vec<serde_json::Value> =
        serde_json::from_str(text).map_err(|e| format!("not a JSON array of machines: {e}"))?;
    let lines = element_lines(text);
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    for (i, v) in values.into_iter().enumerate() {
        let line = lines.get(i).copied().unwrap_or(0);
        match machine_from_json(v) {
            Ok(machine) => rows.push(Row { line, machine }),
            Err(e) => errors.push(RowError {
                line,
                message: format!("entry {}: {e}", i + 1),
            }),
        }
    }
    Ok((rows, errors))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_rows_keep_their_lines() {
        let text = "id,provider,mac_addresses,ssh_endpoint,labels\n\
                    machine-1,fake,02:00:00:00:00:01,root@10.0.0.1:22,rack=r1;gpu=\n\
                    # a comment\n\
                    machine-2,fake,02:00:00:00:00:02 02:00:00:00:01:02,,\n\
                    machine-3,fake\n\
                    machine-4,fake,,,broken\n";
        let (rows, errors) = parse("inv.csv", text).unwrap();
        assert_eq!(
            rows.iter()
                .map(|r| (r.line, r.machine.id.as_str()))
                .collect::<Vec<_>>(),
            [(2, "machine-1"), (4, "machine-2")]
        );
        assert_eq!(
            rows[0].machine.labels.get("rack").map(String::as_str),
            Some("r1")
        );
        assert_eq!(
            rows[1].machine.spec.as_ref().unwrap().mac_addresses.len(),
            2
        );
        assert_eq!(errors.iter().map(|e| e.line).collect::<Vec<_>>(), [5, 6]);
        assert!(
            errors[1].message.contains("key=value"),
            "{}",
            errors[1].message
        );
    }

    #[test]
    fn crlf_files_keep_their_line_numbers() {
        let text = "id,provider,mac_addresses\r\nf-1,fake,02:00:00:00:00:01\r\nf-2,fake,zz\r\n# note\r\nf-3,fake,02:00:00:00:00:03\r\n";
        let (rows, errors) = parse("inv.csv", text).unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            rows.iter()
                .map(|r| (r.line, r.machine.id.as_str()))
                .collect::<Vec<_>>(),
            [(2, "f-1"), (3, "f-2"), (5, "f-3")]
        );
    }

    #[test]
    fn csv_line_numbers_of_a_long_file() {
        let (mut text, mut line) = (String::from("id,provider\n"), 1);
        let mut want = Vec::new();
        for i in 1..=5000 {
            if i % 7 == 0 {
                text.push_str("# a comment\n\n");
                line += 2;
            }
            line += 1;
            want.push((line, format!("m-{i}")));
            text.push_str(&format!("m-{i},fake\n"));
        }
        let (rows, errors) = parse("inv.csv", &text).unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        let got: Vec<(usize, String)> = rows.into_iter().map(|r| (r.line, r.machine.id)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn what_list_prints_can_be_imported() {
        let listed = serde_json::json!([{
            "id": "m-1",
            "spec": {"provider": "fake", "macAddresses": ["02:00:00:00:00:01"], "image": "ubuntu-24.04"},
            "labels": {"rack": "r1"},
            "status": {"phase": "PHASE_READY", "conditions": []},
            "effectiveState": "EFFECTIVE_STATE_IDLE",
            "createTime": "2026-11-23T12:00:00Z"
        }]);
        let (rows, errors) = parse("backup.json", &listed.to_string()).unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        let m = &rows[0].machine;
        assert_eq!(
            m.spec.as_ref().unwrap().mac_addresses,
            ["02:00:00:00:00:01"]
        );
        assert!(m.status.is_none() && m.effective_state == 0 && m.create_time.is_none());
    }

    #[test]
    fn csv_header_mistakes_are_reported() {
        let e = parse("x.csv", "id,provder\nm,fake\n").unwrap_err();
        assert!(e.contains("unknown column \"provder\""), "{e}");
        let e = parse("x.csv", "id,image\nm,x\n").unwrap_err();
        assert!(e.contains("no \"provider\""), "{e}");
    }

    #[test]
    fn json_arrays_and_lines() {
        let text = "[\n  {\"id\": \"a\", \"provider\": \"fake\", \"mac_addresses\": [\"02:00:00:00:00:01\"]},\n  {\"id\": \"b\", \"provder\": \"x\"},\n  {\"id\": \"c\", \"provider\": \"fake\",\n   \"labels\": {\"rack\": \"r1\"}}\n]";
        let (rows, errors) = parse("inv.json", text).unwrap();
        assert_eq!(
            rows.iter()
                .map(|r| (r.line, r.machine.id.as_str()))
                .collect::<Vec<_>>(),
            [(2, "a"), (4, "c")]
        );
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].line, 3);
        assert!(
            errors[0].message.contains("provder"),
            "{}",
            errors[0].message
        );
        let (rows, errors) = parse(
            "inv.jsonl",
            "{\"id\":\"a\",\"provider\":\"fake\"}\nnot json\n",
        )
        .unwrap();
        assert_eq!((rows.len(), errors[0].line), (1, 2));
    }
}
