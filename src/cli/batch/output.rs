//! Batch output: JSONL or CSV rows written whole, only once durable, and reading them back to resume.

use super::*;

/// Where results go: complete records only are written (one input's lines
/// together), in chunks, so that a killed run leaves at most a torn last line.
pub(super) struct Output {
    pub(super) w: Box<dyn Write + Send>,
    pub(super) file: Option<File>,
    pub(super) buf: Vec<u8>,
    pub(super) last_flush: Instant,
    pub(super) format: Format,
    pub(super) header: &'static [&'static str],
    pub(super) need_header: bool,
}

impl Output {
    pub(super) fn flush_if_due(&mut self) -> std::io::Result<()> {
        if self.buf.len() >= 64 << 10 || self.last_flush.elapsed() >= Duration::from_millis(200) {
            self.flush()?;
        }
        Ok(())
    }

    pub(super) fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.w.write_all(&self.buf)?;
            self.w.flush()?;
            self.buf.clear();
        }
        self.last_flush = Instant::now();
        Ok(())
    }

    pub(super) fn finish(mut self) -> anyhow::Result<()> {
        self.flush()?;
        if let Some(f) = &self.file {
            f.sync_data()?;
        }
        Ok(())
    }

    pub(super) fn jsonl(&mut self, v: &impl serde::Serialize) -> anyhow::Result<()> {
        serde_json::to_writer(&mut self.buf, v)?;
        self.buf.push(b'\n');
        Ok(())
    }

    /// Rows of one input: the `rows` column (second) gets their count.
    pub(super) fn csv_rows(&mut self, key: &str, rows: Vec<Vec<String>>) -> anyhow::Result<()> {
        let mut w = csv::WriterBuilder::new().has_headers(false).from_writer(Vec::new());
        if self.need_header {
            w.write_record(self.header)?;
            self.need_header = false;
        }
        let n = rows.len().to_string();
        for r in rows {
            w.write_record(std::iter::once(key).chain(std::iter::once(n.as_str())).chain(r.iter().map(String::as_str)))?;
        }
        self.buf.extend_from_slice(&w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?);
        Ok(())
    }
}

/// Open the output; with `--resume`, also what FILE already answers (key -> times).
pub(super) fn open_output(o: &BatchOut, header: &'static [&'static str], json_key: &str) -> anyhow::Result<(Output, HashMap<String, u32>)> {
    let mut answered: HashMap<String, u32> = HashMap::new();
    let (w, file, need_header): (Box<dyn Write + Send>, Option<File>, bool) = match &o.out {
        None => (Box::new(std::io::stdout()), None, true),
        Some(p) => {
            let mut f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(!o.resume)
                .open(p)
                .with_context(|| format!("opening {}", p.display()))?;
            let mut keep = 0u64;
            if o.resume {
                let mut text = Vec::new();
                f.read_to_end(&mut text)?;
                // A torn last line (the run was killed mid-write) is dropped.
                keep = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i as u64 + 1);
                let text = &text[..keep as usize];
                keep = match o.format {
                    Format::Jsonl => resume_jsonl(text, json_key, &mut answered),
                    Format::Csv => resume_csv(text, &mut answered)?,
                };
                f.set_len(keep)?;
                f.seek(SeekFrom::End(0))?;
            }
            let file = f.try_clone()?;
            (Box::new(f), Some(file), keep == 0)
        }
    };
    let out = Output {
        w,
        file,
        buf: Vec::with_capacity(128 << 10),
        last_flush: Instant::now(),
        format: o.format,
        header,
        need_header: need_header && o.format == Format::Csv,
    };
    Ok((out, answered))
}

/// Keys answered by complete JSON lines; returns how many bytes to keep (up to the first line that does not parse).
pub(super) fn resume_jsonl(text: &[u8], key: &str, answered: &mut HashMap<String, u32>) -> u64 {
    let mut pos = 0usize;
    for line in text.split_inclusive(|&b| b == b'\n') {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else { break };
        let k = match v.get(key) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => break,
        };
        *answered.entry(k).or_default() += 1;
        pos += line.len();
    }
    pos as u64
}

/// Keys answered by complete row groups (the `rows` column says how many
/// rows an input has; a group cut short is dropped and redone).
pub(super) fn resume_csv(text: &[u8], answered: &mut HashMap<String, u32>) -> anyhow::Result<u64> {
    let mut rd = csv::ReaderBuilder::new().has_headers(true).flexible(true).from_reader(text);
    rd.headers()?;
    let mut keep = rd.position().byte();
    // The group being read: key, rows it announces, rows seen.
    let mut group: Option<(String, usize, usize)> = None;
    let mut rec = csv::StringRecord::new();
    while rd.read_record(&mut rec)? {
        let key = rec.get(0).unwrap_or("").to_string();
        let rows: usize = rec.get(1).and_then(|r| r.parse().ok()).unwrap_or(1).max(1);
        let (k, n, seen) = match group.take() {
            Some((k, n, seen)) if k == key && seen < n => (k, n, seen + 1),
            _ => (key, rows, 1),
        };
        if seen == n {
            *answered.entry(k).or_default() += 1;
            keep = rd.position().byte();
        } else {
            group = Some((k, n, seen));
        }
    }
    Ok(keep)
}

/// Which image command, for the columns and JSON shape.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Faces,
    Identify,
    Verify,
    Enrol,
}

pub(super) fn s<T: ToString>(v: T) -> String {
    v.to_string()
}

pub(super) fn bbox(b: &[f32; 4]) -> [String; 4] {
    [s(b[0]), s(b[1]), s(b[2]), s(b[3])]
}

pub(super) fn decision_cols(d: &facematch::compliance::Decision) -> (String, String, String) {
    use facematch::compliance::Decision::*;
    match d {
        Match { subject, template, .. } | NeedsHumanReview { subject, template, .. } => (d.kind().to_string(), s(subject), s(template)),
        NoMatch { .. } => (d.kind().to_string(), String::new(), String::new()),
    }
}

/// One JSON line of an image command (field order = JSON order, `image` first).
#[derive(serde::Serialize)]
pub(super) struct ImageLine<'a> {
    pub(super) image: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) subject: Option<&'a SubjectId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) faces: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) result: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) template: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) face: Option<facematch::probe::FaceBox>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) faces_discarded: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) error: Option<String>,
}

pub(super) fn write_item(out: &mut Output, kind: Kind, item: &BatchItem) -> anyhow::Result<()> {
    let key = path_key(&item.input.path);
    match out.format {
        Format::Jsonl => {
            let mut line = ImageLine {
                image: &key,
                subject: None,
                faces: None,
                result: None,
                template: None,
                face: None,
                faces_discarded: None,
                error: None,
            };
            if matches!(kind, Kind::Verify | Kind::Enrol) {
                line.subject = item.input.subject.as_ref();
            }
            match &item.result {
                Ok(BatchOutput::Faces(f)) => line.faces = Some(serde_json::to_value(&f.faces)?),
                Ok(BatchOutput::Identified(r)) => line.result = Some(serde_json::to_value(r)?),
                Ok(BatchOutput::Verified(r)) => line.result = Some(serde_json::to_value(r)?),
                Ok(BatchOutput::Enrolled(r)) => {
                    line.template = Some(r.template);
                    line.face = Some(r.face);
                    line.faces_discarded = Some(r.faces_discarded);
                }
                Ok(_) => bail!("unexpected result kind"),
                Err(e) => line.error = Some(e.to_string()),
            }
            out.jsonl(&line)
        }
        Format::Csv => {
            let width = out.header.len() - 2;
            let err_row = |e: String| {
                let mut r = vec![String::new(); width];
                r[0] = "error".into();
                if matches!(kind, Kind::Verify | Kind::Enrol) {
                    r[1] = item.input.subject.as_ref().map(s).unwrap_or_default();
                }
                r[width - 1] = e;
                r
            };
            let rows: Vec<Vec<String>> = match &item.result {
                Err(e) => vec![err_row(e.to_string())],
                Ok(BatchOutput::Faces(f)) => {
                    if f.faces.is_empty() {
                        let mut r = vec![String::new(); width];
                        r[0] = "no_face".into();
                        vec![r]
                    } else {
                        f.faces
                            .iter()
                            .enumerate()
                            .map(|(i, face)| {
                                let [x, y, w, h] = bbox(&face.bbox);
                                let emb = face
                                    .embedding
                                    .as_ref()
                                    .map(|e| e.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(" "))
                                    .unwrap_or_default();
                                vec!["ok".into(), s(i), x, y, w, h, s(face.score), emb, String::new()]
                            })
                            .collect()
                    }
                }
                Ok(BatchOutput::Identified(r)) => {
                    let tail = [s(r.faces_found), s(r.faces_discarded)];
                    if r.matches.is_empty() {
                        let mut row = vec![
                            "ok".to_string(),
                            String::new(),
                            String::new(),
                            String::new(),
                            String::new(),
                            String::new(),
                            "no_match".into(),
                        ];
                        row.extend([String::new(), String::new(), String::new(), String::new()]);
                        row.extend(tail.clone());
                        row.extend([String::new(), String::new()]);
                        vec![row]
                    } else {
                        r.matches
                            .iter()
                            .map(|m| {
                                let id = &m.identification;
                                let (d, sub, t) = decision_cols(&id.decision);
                                let score = id.candidates.first().map(|c| s(c.score)).unwrap_or_default();
                                let [x, y, w, h] = bbox(&m.face.bbox);
                                let mut row = vec!["ok".into(), x, y, w, h, s(m.face.score), d, sub, t, score, s(id.threshold.value())];
                                row.extend(tail.clone());
                                row.extend([s(id.audit_seq), String::new()]);
                                row
                            })
                            .collect()
                    }
                }
                Ok(BatchOutput::Verified(r)) => {
                    let v = &r.verification;
                    let [x, y, w, h] = bbox(&r.face.bbox);
                    vec![vec![
                        "ok".into(),
                        item.input.subject.as_ref().map(s).unwrap_or_default(),
                        x,
                        y,
                        w,
                        h,
                        s(r.face.score),
                        v.decision.kind().to_string(),
                        v.score.map(s).unwrap_or_default(),
                        s(v.threshold.value()),
                        s(r.faces_found),
                        s(r.faces_discarded),
                        s(v.audit_seq),
                        String::new(),
                    ]]
                }
                Ok(BatchOutput::Enrolled(r)) => {
                    let [x, y, w, h] = bbox(&r.face.bbox);
                    vec![vec![
                        "ok".into(),
                        s(&r.subject),
                        s(r.template),
                        r.consent_id.clone(),
                        x,
                        y,
                        w,
                        h,
                        s(r.face.score),
                        s(r.faces_discarded),
                        String::new(),
                    ]]
                }
                Ok(_) => bail!("unexpected result kind"),
            };
            out.csv_rows(&key, rows)
        }
    }
}

pub(super) fn write_query(out: &mut Output, item: &EmbeddingItem) -> anyhow::Result<()> {
    match out.format {
        Format::Jsonl => {
            let v = match &item.result {
                Ok(r) => serde_json::json!({"query": item.query, "candidates": r.candidates, "decision": r.decision}),
                Err(e) => serde_json::json!({"query": item.query, "error": e.to_string()}),
            };
            out.jsonl(&v)
        }
        Format::Csv => {
            let rows = match &item.result {
                Err(e) => vec![vec![
                    "error".into(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    e.to_string(),
                ]],
                Ok(r) => {
                    let d = r.decision.kind().to_string();
                    let t = s(r.threshold.value());
                    if r.candidates.is_empty() {
                        vec![vec![
                            "ok".into(),
                            String::new(),
                            String::new(),
                            String::new(),
                            String::new(),
                            d,
                            t,
                            s(r.audit_seq),
                            String::new(),
                        ]]
                    } else {
                        r.candidates
                            .iter()
                            .enumerate()
                            .map(|(i, c)| {
                                vec![
                                    "ok".into(),
                                    s(i + 1),
                                    s(&c.subject),
                                    s(c.template),
                                    s(c.score),
                                    d.clone(),
                                    t.clone(),
                                    s(r.audit_seq),
                                    String::new(),
                                ]
                            })
                            .collect()
                    }
                }
            };
            out.csv_rows(&item.query.to_string(), rows)
        }
    }
}
