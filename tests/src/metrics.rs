//! Scraping a daemon's or tracker's `--metrics` endpoint and reading values out of the text,
//! as Prometheus would: every sample line must parse, or the scrape is an error.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// The samples of one scrape: `name{labels}` (exactly as written) to value.
#[derive(Debug, Default)]
pub struct Scrape {
    pub samples: HashMap<String, f64>,
    pub text: String,
}

impl Scrape {
    /// The value of `series` (`name` or `name{label="value"}`), if present.
    pub fn get(&self, series: &str) -> Option<f64> {
        self.samples.get(series).copied()
    }

    /// The value of `series`, or a panic that shows the scrape.
    pub fn value(&self, series: &str) -> f64 {
        self.get(series)
            .unwrap_or_else(|| panic!("no {series} in the metrics:\n{}", self.text))
    }
}

/// `GET /metrics` from `addr`; panics unless the answer is a 200 whose every line parses.
pub fn scrape(addr: SocketAddr) -> Scrape {
    let mut s = TcpStream::connect(addr).expect("connecting to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .expect("sending the request");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("reading the metrics");
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    parse(body).unwrap_or_else(|e| panic!("the metrics do not parse: {e}\n{body}"))
}

/// Parses the text format: comments, then `series value` lines, ending with `# EOF`.
pub fn parse(text: &str) -> Result<Scrape, String> {
    let mut samples = HashMap::new();
    if !text.ends_with("# EOF\n") {
        return Err("no # EOF at the end".into());
    }
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line
            .rsplit_once(' ')
            .ok_or_else(|| format!("no value in {line:?}"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().map_err(|e| format!("{line:?}: {e}"))?,
        };
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        {
            return Err(format!("bad metric name in {line:?}"));
        }
        if name_end < series.len() && !series.ends_with('}') {
            return Err(format!("unclosed labels in {line:?}"));
        }
        samples.insert(series.to_string(), value);
    }
    Ok(Scrape {
        samples,
        text: text.to_string(),
    })
}
