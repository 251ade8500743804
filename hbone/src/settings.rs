//! HTTP/2 settings for HBONE connections, with ztunnel's defaults.

/// HTTP/2 settings for both sides of an HBONE connection. Every field is configurable; the
/// defaults are ztunnel's so a mixed mesh behaves alike.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct H2Settings {
    /// Initial per-stream flow-control window (SETTINGS_INITIAL_WINDOW_SIZE).
    pub stream_window: u32,
    /// Connection-level flow-control window.
    pub connection_window: u32,
    /// Largest frame payload we accept (SETTINGS_MAX_FRAME_SIZE).
    pub max_frame_size: u32,
    /// Concurrent streams a server accepts on one connection.
    pub max_concurrent_streams: u32,
    /// Largest header block we accept, in bytes (SETTINGS_MAX_HEADER_LIST_SIZE).
    pub max_header_list_size: u32,
    /// Bytes h2 may buffer per stream for sending before the writer must wait.
    pub max_send_buffer_size: usize,
    /// Streams a peer may reset before the connection is considered abusive (reset flood).
    pub max_concurrent_reset_streams: usize,
    /// Locally-refused streams tolerated before the connection is closed (reset-flood guard).
    pub max_local_error_reset_streams: usize,
}

impl Default for H2Settings {
    fn default() -> Self {
        H2Settings {
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            max_concurrent_streams: 200,
            max_header_list_size: 16 * 1024,
            max_send_buffer_size: 1024 * 1024,
            max_concurrent_reset_streams: 50,
            max_local_error_reset_streams: 1024,
        }
    }
}

impl H2Settings {
    /// Frame sizes the protocol allows (RFC 9113 §6.5.2).
    pub const FRAME_SIZE_RANGE: std::ops::RangeInclusive<u32> = 16_384..=16_777_215;

    /// Clamps values into what HTTP/2 allows, so a config typo cannot make h2 panic.
    pub fn sanitized(mut self) -> Self {
        self.max_frame_size = self.max_frame_size.clamp(
            *Self::FRAME_SIZE_RANGE.start(),
            *Self::FRAME_SIZE_RANGE.end(),
        );
        self.stream_window = self.stream_window.min(i32::MAX as u32);
        self.connection_window = self.connection_window.min(i32::MAX as u32);
        self.max_concurrent_streams = self.max_concurrent_streams.max(1);
        self
    }

    /// An h2 client builder with these settings (push disabled: HBONE never pushes).
    pub fn client_builder(&self) -> h2::client::Builder {
        let s = self.clone().sanitized();
        let mut b = h2::client::Builder::new();
        b.initial_window_size(s.stream_window)
            .initial_connection_window_size(s.connection_window)
            .max_frame_size(s.max_frame_size)
            .max_header_list_size(s.max_header_list_size)
            .max_send_buffer_size(s.max_send_buffer_size)
            .max_concurrent_reset_streams(s.max_concurrent_reset_streams)
            .enable_push(false);
        b
    }

    /// An h2 server builder with these settings.
    pub fn server_builder(&self) -> h2::server::Builder {
        let s = self.clone().sanitized();
        let mut b = h2::server::Builder::new();
        b.initial_window_size(s.stream_window)
            .initial_connection_window_size(s.connection_window)
            .max_frame_size(s.max_frame_size)
            .max_concurrent_streams(s.max_concurrent_streams)
            .max_header_list_size(s.max_header_list_size)
            .max_send_buffer_size(s.max_send_buffer_size)
            .max_concurrent_reset_streams(s.max_concurrent_reset_streams)
            .max_local_error_reset_streams(Some(s.max_local_error_reset_streams));
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_ztunnels() {
        let s = H2Settings::default();
        assert_eq!(s.stream_window, 4 << 20);
        assert_eq!(s.connection_window, 16 << 20);
        assert_eq!(s.max_frame_size, 1 << 20);
        assert_eq!(s.max_concurrent_streams, 200);
    }

    #[test]
    fn out_of_range_values_are_clamped() {
        let s = H2Settings {
            max_frame_size: 1,
            stream_window: u32::MAX,
            max_concurrent_streams: 0,
            ..Default::default()
        }
        .sanitized();
        assert_eq!(s.max_frame_size, 16_384);
        assert_eq!(s.stream_window, i32::MAX as u32);
        assert_eq!(s.max_concurrent_streams, 1);
        // Builders must not panic on sanitized values.
        let _ = s.client_builder();
        let _ = s.server_builder();
    }
}
