//! placeholder
#![no_std]
#![no_main]

inmate_rt::entry!(main);

fn main(cmdline: &inmate_rt::Cmdline) -> ! {
    inmate_rt::println!("hello from inmate, cmdline {:?}", cmdline.as_str());
    inmate_rt::shutdown()
}
