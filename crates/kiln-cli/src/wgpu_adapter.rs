//! Picking the wgpu adapter `run.device` names, with an error that lists what this machine
//! has instead of CubeCL's panic when there is none.
//!
//! CubeCL selects adapters of the graphics API it compiles for (Vulkan on Linux and
//! Windows, Metal on macOS) the same way: the N-th adapter of the named kind, falling back
//! to an adapter of kind "other". This module asks wgpu for the same list first.

use anyhow::{Result, bail};
use kiln_models::backend::backends::cubecl::WgpuDevice;
use kiln_recipe::WgpuDeviceSpec;

/// The graphics API CubeCL's wgpu runtime uses on this platform.
fn graphics_backend() -> wgpu::Backend {
    if cfg!(target_os = "macos") {
        wgpu::Backend::Metal
    } else {
        wgpu::Backend::Vulkan
    }
}

/// Every adapter wgpu finds for [`graphics_backend`].
pub fn adapters() -> Vec<wgpu::AdapterInfo> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: graphics_backend().into(),
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    block_on(instance.enumerate_adapters(graphics_backend().into()))
        .iter()
        .map(wgpu::Adapter::get_info)
        .collect()
}

/// One adapter, as the error and the run's log show it.
pub fn describe(info: &wgpu::AdapterInfo) -> String {
    let kind = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => "discrete",
        wgpu::DeviceType::IntegratedGpu => "integrated",
        wgpu::DeviceType::VirtualGpu => "virtual",
        wgpu::DeviceType::Cpu => "software",
        wgpu::DeviceType::Other => "other",
    };
    let driver = [info.driver.as_str(), info.driver_info.as_str()]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    format!("{} ({kind}, {:?}, {driver})", info.name, info.backend)
}

/// The device `device` names, once an adapter for it is known to exist; the adapter it will
/// be is printed to stderr.
pub fn select(device: &str) -> Result<WgpuDevice> {
    let Some(spec) = WgpuDeviceSpec::parse(device) else {
        bail!(
            "run.device = \"{device}\" is not a wgpu device: use `default`, `discrete:N`, \
             `integrated:N`, `virtual:N`, or `software` for a CPU driver such as lavapipe"
        );
    };
    let found = adapters();
    let wanted = |t: wgpu::DeviceType| match spec {
        WgpuDeviceSpec::Default => true,
        WgpuDeviceSpec::Discrete(_) => t == wgpu::DeviceType::DiscreteGpu,
        WgpuDeviceSpec::Integrated(_) => t == wgpu::DeviceType::IntegratedGpu,
        WgpuDeviceSpec::Virtual(_) => t == wgpu::DeviceType::VirtualGpu,
        WgpuDeviceSpec::Software => t == wgpu::DeviceType::Cpu,
    };
    let index = match spec {
        WgpuDeviceSpec::Discrete(n)
        | WgpuDeviceSpec::Integrated(n)
        | WgpuDeviceSpec::Virtual(n) => n,
        WgpuDeviceSpec::Default | WgpuDeviceSpec::Software => 0,
    };
    let mut same_kind: Vec<&wgpu::AdapterInfo> =
        found.iter().filter(|a| wanted(a.device_type)).collect();
    if spec == WgpuDeviceSpec::Default {
        // wgpu's high-performance choice: discrete, then integrated, virtual, software.
        same_kind.sort_by_key(|a| match a.device_type {
            wgpu::DeviceType::DiscreteGpu => 0,
            wgpu::DeviceType::IntegratedGpu => 1,
            wgpu::DeviceType::VirtualGpu => 2,
            wgpu::DeviceType::Cpu => 3,
            wgpu::DeviceType::Other => 4,
        });
    }
    let other: Vec<&wgpu::AdapterInfo> = found
        .iter()
        .filter(|a| a.device_type == wgpu::DeviceType::Other)
        .collect();
    let Some(adapter) = same_kind.get(index).or_else(|| other.get(index)) else {
        let list = if found.is_empty() {
            format!(
                "no {:?} adapter at all: install a driver (on Debian or Ubuntu, \
                 `apt-get install mesa-vulkan-drivers` gives lavapipe, a Vulkan driver on the CPU; \
                 then use run.device = \"software\")",
                graphics_backend()
            )
        } else {
            let names: Vec<String> = found.iter().map(describe).collect();
            format!(
                "the {:?} adapters here: {}",
                graphics_backend(),
                names.join("; ")
            )
        };
        bail!("run.device = \"{device}\": no such wgpu adapter on this machine; {list}");
    };
    eprintln!("wgpu adapter: {}", describe(adapter));
    Ok(match spec {
        WgpuDeviceSpec::Default => WgpuDevice::DefaultDevice,
        WgpuDeviceSpec::Discrete(n) => WgpuDevice::DiscreteGpu(n),
        WgpuDeviceSpec::Integrated(n) => WgpuDevice::IntegratedGpu(n),
        WgpuDeviceSpec::Virtual(n) => WgpuDevice::VirtualGpu(n),
        WgpuDeviceSpec::Software => WgpuDevice::Cpu,
    })
}

/// Polls a future to completion on this thread: wgpu's adapter enumeration is ready at once
/// on native platforms.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::yield_now();
    }
}
