//! Framing shared by both ends of a connection: a 4-byte big-endian length, then the body.
//!
//! The length is checked against the limit as soon as its four bytes arrive, so an oversized
//! frame is refused before a byte of it is buffered.

use tokio::net::TcpStream;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

/// Frame overhead allowed on top of the largest message a broker accepts (ids, names, keys).
pub const FRAME_OVERHEAD: usize = 64 * 1024;

/// The largest frame a client accepts from a broker (a fetch is capped well below this).
pub const CLIENT_MAX_FRAME: usize = 64 * 1024 * 1024;

pub fn codec(max_frame: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_type::<u32>()
        .max_frame_length(max_frame)
        .new_codec()
}

pub type FramedStream = Framed<TcpStream, LengthDelimitedCodec>;

pub fn framed(stream: TcpStream, max_frame: usize) -> FramedStream {
    Framed::new(stream, codec(max_frame))
}

/// Whether an I/O error from the codec means the peer announced a frame over the limit.
pub fn is_oversized(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::InvalidData && e.to_string().contains("frame size too big")
}
