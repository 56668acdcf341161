using KernelLM.Native;
using KernelLM.Runtime.Cuda;
using KernelLM.Runtime.Cuda.Driver;

namespace KernelLM.Tests.Cuda;

/// <summary>
/// The driver backend where there is no GPU (this machine, CI): libcuda is absent, or present and cuInit says
/// CUDA_ERROR_NO_DEVICE (CI unpacks Debian's libcuda1 and points KERNELLM_LIBCUDA at it). On a GPU machine
/// the same tests check the other branch, so none of them is skipped anywhere.
/// </summary>
[TestFixture]
public sealed class DriverBackendTests
{
    [Test]
    public void CuInit_reports_no_device_or_libcuda_is_absent()
    {
        var status = CudaDriverStatus.Current;
        TestContext.Out.WriteLine($"{status.Library.Describe()}; {status}");
        if (!status.Library.Found)
        {
            Assert.That(status.InitResult, Is.Null, "cuInit is not called without libcuda");
            Assert.That(status.Problem, Does.StartWith("no CUDA device: the CUDA driver library is not installed").And.Contain("libcuda.so.1"));
            return;
        }
        Assert.That(status.DriverVersion, Is.GreaterThan(0), "cuDriverGetVersion works without a device");
        if (CudaTestSupport.HasDevice)
        {
            Assert.That(status.InitResult, Is.EqualTo(CUresult.CUDA_SUCCESS));
            Assert.That(status.Devices.Select(device => device.Name), Is.All.Not.Empty);
            Assert.That(status.Problem, Is.Null);
            return;
        }
        Assert.That(CudaDriver.cuInit(0), Is.EqualTo(CUresult.CUDA_ERROR_NO_DEVICE), "the raw binding");
        Assert.That(status.InitResult, Is.EqualTo(CUresult.CUDA_ERROR_NO_DEVICE));
        Assert.That(status.Problem, Is.EqualTo("no CUDA device: cuInit(0) returned CUDA_ERROR_NO_DEVICE (no CUDA-capable device is detected)"));
        Assert.That(status.ProblemErrorName, Is.EqualTo("CUDA_ERROR_NO_DEVICE"));
    }

    [Test]
    public void Creating_the_backend_opens_the_gpu_or_says_no_cuda_device()
    {
        if (CudaTestSupport.HasDevice)
        {
            using var backend = new DriverBackend();
            Assert.That(backend.DeviceName, Is.EqualTo(CudaDriverStatus.Current.Devices[0].Name));
            Assert.That(backend.IsEmulated, Is.False);
            return;
        }
        var error = Assert.Throws<CudaException>(() => new DriverBackend().Dispose())!;
        TestContext.Out.WriteLine(error.Message);
        Assert.That(error.Message, Does.StartWith("no CUDA device: "));
        if (NativeLibraries.Load(NativeLibraries.Cuda).Found)
        {
            Assert.That(error.ErrorName, Is.EqualTo("CUDA_ERROR_NO_DEVICE"));
        }
    }

    [Test]
    public void A_missing_libcuda_is_reported_with_the_names_tried()
    {
        var probe = NativeLibraries.Probe(NativeLibraries.Cuda, name => name == "KERNELLM_LIBCUDA" ? "/nonexistent/libcuda.so.1" : null);
        Assert.That(probe.Found, Is.False);
        Assert.That(probe.Describe(), Is.EqualTo("libcuda not found: tried /nonexistent/libcuda.so.1 (cannot open shared object file: No such file or directory)"));
    }
}
