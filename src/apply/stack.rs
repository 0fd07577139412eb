//! Lines of /proc/PID/stack: `[<0>] function+0xoffset/0xsize [module]`.

/// One frame of a task's kernel stack listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub function: String,
    pub offset: u64,
    /// The function's size as the listing gives it (up to the next symbol).
    pub size: Option<u64>,
    /// The module the code belongs to; None for vmlinux.
    pub module: Option<String>,
    /// The line without its `[<0>]` prefix, for messages.
    pub text: String,
}

impl Frame {
    pub fn parse(line: &str) -> Option<Frame> {
        let rest = line.split_once("] ").map_or(line, |(_, r)| r).trim();
        let mut words = rest.split_whitespace();
        let location = words.next()?;
        let module = words
            .next()
            .map(|m| m.trim_matches(|c| c == '[' || c == ']').to_string());
        let (function, place) = location.split_once('+')?;
        let (offset, size) = place.split_once('/').unwrap_or((place, ""));
        let hex = |n: &str| u64::from_str_radix(n.trim_start_matches("0x"), 16).ok();
        Some(Frame {
            function: function.to_string(),
            offset: hex(offset)?,
            size: hex(size),
            module,
            text: rest.to_string(),
        })
    }
}

/// Every frame of a listing, innermost first.
pub fn frames(stack: &str) -> Vec<Frame> {
    stack.lines().filter_map(Frame::parse).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_stack_frames() {
        let f = Frame::parse("[<0>] pipe_write+0x1a3/0x4b0").unwrap();
        assert_eq!((f.function.as_str(), f.offset), ("pipe_write", 0x1a3));
        assert!(f.module.is_none());
        let f =
            Frame::parse("[<0>] __dynamos_sync_bodies_pipe_write.isra.0+0x2f/0x700 [dynamos_x]")
                .unwrap();
        assert_eq!(f.function, "__dynamos_sync_bodies_pipe_write.isra.0");
        assert_eq!(f.module.as_deref(), Some("dynamos_x"));
    }
}
