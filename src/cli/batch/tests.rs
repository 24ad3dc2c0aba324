//! Resume parsing (torn JSON line, CSV row group cut short, repeated inputs).

use super::*;

#[test]
fn resume_jsonl_counts_repeats_and_stops_at_a_bad_line() {
    let text = b"{\"image\":\"a.jpg\",\"faces\":[]}\n{\"image\":\"a.jpg\",\"error\":\"x\"}\n{\"image\":\"b.jpg\",\"fa\n";
    let mut seen = HashMap::new();
    let keep = resume_jsonl(text, "image", &mut seen);
    assert_eq!(keep as usize, text.iter().enumerate().filter(|(_, &b)| b == b'\n').nth(1).unwrap().0 + 1);
    assert_eq!(seen, HashMap::from([("a.jpg".to_string(), 2)]));
    let mut seen = HashMap::new();
    resume_jsonl(b"{\"query\":7,\"candidates\":[]}\n", "query", &mut seen);
    assert_eq!(seen, HashMap::from([("7".to_string(), 1)]));
}

#[test]
fn resume_csv_drops_a_row_group_cut_short() {
    let full = "input,rows,status\na.jpg,2,ok\na.jpg,2,ok\n\"b,1.jpg\",1,error\nc.jpg,3,ok\nc.jpg,3,ok\n";
    let mut seen = HashMap::new();
    let keep = resume_csv(full.as_bytes(), &mut seen).unwrap() as usize;
    assert_eq!(&full[..keep], "input,rows,status\na.jpg,2,ok\na.jpg,2,ok\n\"b,1.jpg\",1,error\n");
    assert_eq!(seen, HashMap::from([("a.jpg".to_string(), 1), ("b,1.jpg".to_string(), 1)]));
    // Only a header: keep it; nothing at all: keep nothing (the header is written again).
    assert_eq!(resume_csv(b"input,rows,status\n", &mut HashMap::new()).unwrap(), 18);
    assert_eq!(resume_csv(b"", &mut HashMap::new()).unwrap(), 0);
}

#[test]
fn answered_inputs_are_skipped_as_often_as_they_were_answered() {
    let skipped = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let it: Box<dyn Iterator<Item = String> + Send> = Box::new(["a", "b", "a", "a", "c"].into_iter().map(String::from));
    let left: Vec<String> =
        skip_answered(it, HashMap::from([("a".to_string(), 2), ("c".to_string(), 1)]), |s: &String| s.clone(), &skipped).collect();
    assert_eq!(left, ["b", "a"]);
    assert_eq!(skipped.load(Ordering::Relaxed), 3);
}
