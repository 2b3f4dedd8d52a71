//! The NATS layer, and the only code that knows stream, bucket, subject and key names:
//! [`store`] connects and lays out the streams and buckets, [`keys`] names and escapes
//! everything stored, [`registry`] follows the meter definitions every process shares, [`meters`] reads and
//! writes them (and their build progress) as typed values, [`read_cache`] keeps the
//! readings queries read lately.
//! Everything else asks these for typed values.

pub mod keys;
pub(crate) mod meters;
pub(crate) mod read_cache;
pub(crate) mod registry;
pub mod store;
