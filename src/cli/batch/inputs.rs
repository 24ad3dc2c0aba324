//! Where batch inputs come from: files and directories, lists, pairs CSV; skipping what a resumed run answered.

use super::*;

pub(super) fn list_lines(list: &Path) -> anyhow::Result<Box<dyn Iterator<Item = String> + Send>> {
    let reader: Box<dyn BufRead + Send> = if list.as_os_str() == "-" {
        Box::new(BufReader::new(std::io::stdin()))
    } else {
        Box::new(BufReader::new(File::open(list).with_context(|| format!("opening {}", list.display()))?))
    };
    Ok(Box::new(reader.lines().map_while(|l| l.ok()).map(|l| l.trim_end_matches('\r').to_string()).filter(|l| !l.trim().is_empty())))
}

/// The paths to process, lazily, and their number when a progress bar needs it
/// (counted by a first walk of the tree and the list, holding neither).
pub(super) fn image_paths(inp: &ImageInputs, o: &BatchOut) -> anyhow::Result<(Box<dyn Iterator<Item = PathBuf> + Send>, Option<u64>)> {
    let walk = batch::walk_images(inp.inputs.clone());
    let mut total = shows_bar(o).then(|| batch::walk_images(inp.inputs.clone()).count() as u64);
    let it: Box<dyn Iterator<Item = PathBuf> + Send> = match &inp.from_list {
        None => Box::new(walk),
        Some(list) => {
            if list.as_os_str() == "-" {
                total = None;
            } else if let Some(t) = &mut total {
                *t += list_lines(list)?.count() as u64;
            }
            Box::new(walk.chain(list_lines(list)?.map(PathBuf::from)))
        }
    };
    if inp.inputs.is_empty() && inp.from_list.is_none() {
        bail!("no inputs: name image files or directories, or --from-list FILE");
    }
    Ok((it, total))
}

/// `verify --pairs FILE.csv`: rows `image,subject` (a header row `image,subject` is skipped).
pub(super) fn pairs(file: &Path) -> anyhow::Result<(Inputs, Option<u64>)> {
    let count = || -> anyhow::Result<u64> {
        Ok(csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            // A regular file (read twice: counted, then read), never a FIFO that could block.
            .from_reader(facematch::fs::open_input(file)?)
            .records()
            .count() as u64)
    };
    let total = count()?;
    let rd = csv::ReaderBuilder::new().has_headers(false).flexible(true).trim(csv::Trim::All).from_reader(facematch::fs::open_input(file)?);
    let mut first = true;
    let it = rd.into_records().filter_map(move |r| {
        let header = std::mem::take(&mut first);
        let r = r.ok()?;
        let image = r.get(0).unwrap_or("").to_string();
        let subject = r.get(1).unwrap_or("");
        if header && image.eq_ignore_ascii_case("image") && subject.eq_ignore_ascii_case("subject") {
            return None;
        }
        Some(match SubjectId::new(subject) {
            Ok(s) => BatchInput::with_subject(image, s),
            Err(_) => BatchInput::new(image), // reported as "no subject"
        })
    });
    Ok((Box::new(it), Some(total)))
}

/// Drop inputs already answered (the n-th occurrence of a key is skipped while FILE answers it n times).
pub(super) fn skip_answered<T, F>(
    it: Box<dyn Iterator<Item = T> + Send>,
    mut answered: HashMap<String, u32>,
    key: F,
    skipped: &std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> Box<dyn Iterator<Item = T> + Send>
where
    T: 'static,
    F: Fn(&T) -> String + Send + 'static,
{
    if answered.is_empty() {
        return it;
    }
    let skipped = skipped.clone();
    Box::new(it.filter(move |x| match answered.get_mut(&key(x)) {
        Some(n) if *n > 0 => {
            *n -= 1;
            skipped.fetch_add(1, Ordering::Relaxed);
            false
        }
        _ => true,
    }))
}

pub(super) fn path_key(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}
