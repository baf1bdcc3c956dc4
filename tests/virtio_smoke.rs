mod virtio_common;
use virtio_common::*;

#[test]
fn single_read() {
    let mut d = Driver::ready(0);
    let (s, data) = d.read(8, 4096);
    assert_eq!(s, 0);
    assert_eq!(data, image(8192)[4096..].to_vec());
    assert_eq!(d.used_elem(0).1, 4097);
    assert_eq!(d.isr() & 1, 1);
}
