//! Fixed-size typed messages over a ring.

use core::marker::PhantomData;
use core::mem::size_of;

use bytemuck::Pod;

use crate::{Consumer, Error, Frame, Notify, PeerBytes, Producer, Received};

/// Sends values of a plain-old-data type `T`, one frame each.
#[derive(Debug)]
pub struct TypedProducer<T: Pod> {
    inner: Producer,
    _type: PhantomData<fn(T)>,
}

impl<T: Pod> TypedProducer<T> {
    /// Wraps a producer; [`Error::TooLarge`] if `T` can never fit a frame of this ring.
    pub fn new(inner: Producer) -> Result<Self, Error> {
        if size_of::<T>() > inner.max_frame_len() {
            return Err(Error::TooLarge {
                len: size_of::<T>(),
                max: inner.max_frame_len(),
            });
        }
        Ok(Self {
            inner,
            _type: PhantomData,
        })
    }

    /// Copies `value` into the ring and publishes it.
    #[inline]
    pub fn try_send(&mut self, value: &T) -> Result<Notify, Error> {
        self.inner.try_send(bytemuck::bytes_of(value))
    }

    /// Copies `value` into the ring without publishing it (batching; see [`flush`](Self::flush)).
    #[inline]
    pub fn try_push(&mut self, value: &T) -> Result<(), Error> {
        let mut grant = self.inner.grant(size_of::<T>())?;
        grant.copy_from_slice(bytemuck::bytes_of(value));
        grant.commit();
        Ok(())
    }

    /// Publishes every pushed value.
    #[inline]
    pub fn flush(&mut self) -> Notify {
        self.inner.flush()
    }

    /// The untyped producer.
    pub fn into_inner(self) -> Producer {
        self.inner
    }

    /// The untyped producer, borrowed (for the back-pressure handshake, free space, ...).
    pub fn producer(&mut self) -> &mut Producer {
        &mut self.inner
    }
}

/// Receives values of a plain-old-data type `T`, one frame each.
#[derive(Debug)]
pub struct TypedConsumer<T: Pod> {
    inner: Consumer,
    _type: PhantomData<fn() -> T>,
}

impl<T: Pod> TypedConsumer<T> {
    /// Wraps a consumer.
    pub fn new(inner: Consumer) -> Self {
        Self {
            inner,
            _type: PhantomData,
        }
    }

    /// The next record, zero-copy, inside shared memory; `None` if the ring is empty. A frame
    /// whose length is not `size_of::<T>()` is [`Error::Corrupt`] and stays in the ring: like
    /// every `Corrupt`, it is sticky until the layer above resets the ring (the peer broke the
    /// protocol, so skipping the frame would only hide it).
    #[inline]
    pub fn peek(&mut self) -> Result<Option<TypedFrame<'_, T>>, Error> {
        match self.inner.peek()? {
            None => Ok(None),
            Some(frame) if frame.len() != size_of::<T>() => Err(Error::Corrupt {
                what: "typed frame of the wrong length",
            }),
            Some(frame) => Ok(Some(TypedFrame {
                frame,
                _type: PhantomData,
            })),
        }
    }

    /// Copies out, releases and publishes the next value (errors as [`peek`](Self::peek));
    /// the same shape as [`Consumer::try_recv`], with the record in [`Received::value`].
    #[inline]
    pub fn try_recv(&mut self) -> Result<Option<Received<T>>, Error> {
        let value = match self.peek()? {
            None => return Ok(None),
            Some(record) => {
                let value = record.read();
                record.release();
                value
            }
        };
        Ok(Some(Received {
            len: size_of::<T>(),
            value,
            notify: self.inner.flush(),
        }))
    }

    /// Publishes every released record (see [`Consumer::flush`]).
    #[inline]
    pub fn flush(&mut self) -> Notify {
        self.inner.flush()
    }

    /// The untyped consumer.
    pub fn into_inner(self) -> Consumer {
        self.inner
    }

    /// The untyped consumer, borrowed (for the sleep handshake, ...).
    pub fn consumer(&mut self) -> &mut Consumer {
        &mut self.inner
    }
}

/// A record of type `T` inside shared memory, handed out by [`TypedConsumer::peek`]. The
/// producer may write it at any time: [`read`](Self::read) takes one snapshot of the whole
/// value, [`payload`](Self::payload) reads single fields (at `offset_of!` offsets).
pub struct TypedFrame<'a, T: Pod> {
    frame: Frame<'a>,
    _type: PhantomData<fn() -> T>,
}

impl<T: Pod> TypedFrame<'_, T> {
    /// A copy of the record (one volatile read of `size_of::<T>()` bytes). Use the copy; do
    /// not read the record again to re-check a field.
    #[inline]
    pub fn read(&self) -> T {
        // The length was checked against size_of::<T>() at peek.
        self.frame
            .payload()
            .read::<T>(0)
            .unwrap_or_else(|_| T::zeroed())
    }

    /// The frame's application kind (as [`Frame::kind`]).
    #[inline]
    pub fn kind(&self) -> u16 {
        self.frame.kind()
    }

    /// The record's bytes, for reading single fields at their offsets.
    #[inline]
    pub fn payload(&self) -> PeerBytes<'_> {
        self.frame.payload()
    }

    /// Releases the record (local until [`TypedConsumer::flush`] or the next
    /// [`TypedConsumer::try_recv`]).
    #[inline]
    pub fn release(self) {
        self.frame.release();
    }
}

impl<T: Pod> core::fmt::Debug for TypedFrame<'_, T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("TypedFrame")
            .field("frame", &self.frame)
            .finish()
    }
}
