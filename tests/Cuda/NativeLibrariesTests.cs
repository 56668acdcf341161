using KernelLM.Native;
using KernelLM.Runtime.Cuda;

namespace KernelLM.Tests.Cuda;

/// <summary>The native library resolver and the per-library error checks.</summary>
[TestFixture]
public sealed class NativeLibrariesTests
{
    private static string? NoEnvironment(string name) => null;

    [Test]
    public void The_resolver_finds_nvrtc_and_preloads_its_builtins()
    {
        CudaTestSupport.RequireNvrtc();
        var nvrtc = NativeLibraries.Load(NativeLibraries.Nvrtc);
        TestContext.Out.WriteLine(nvrtc.Describe());
        Assert.That(nvrtc.Found, Is.True);
        Assert.That(nvrtc.LoadedName, Does.StartWith("libnvrtc.so").Or.EqualTo(Environment.GetEnvironmentVariable("KERNELLM_LIBNVRTC")));
        Assert.That(nvrtc.Path, Is.Not.Null.And.Contains("libnvrtc.so"), "the loader's path of the library (dlinfo)");
        Assert.That(File.Exists(nvrtc.ResolvedPath), Is.True, nvrtc.ResolvedPath);
        var builtins = NativeLibraries.NvrtcBuiltinsProbe;
        Assert.That(builtins, Is.Not.Null);
        TestContext.Out.WriteLine(builtins!.Describe());
        Assert.That(builtins.Found, Is.True, builtins.Describe());
        Assert.That(builtins.LoadedName, Does.Contain($"libnvrtc-builtins.so.{KernelLM.Runtime.Cuda.Driver.NvrtcCompiler.Info.Major}"));
        Assert.That(NativeLibraries.Probed.Select(probe => probe.Library), Does.Contain(NativeLibraries.Nvrtc).And.Contain(NativeLibraries.NvrtcBuiltins));
    }

    [Test]
    public void An_environment_override_is_the_only_file_tried()
    {
        CudaTestSupport.RequireNvrtc();
        string real = NativeLibraries.Load(NativeLibraries.Nvrtc).ResolvedPath!;
        var overridden = NativeLibraries.Probe(NativeLibraries.Nvrtc, name => name == "KERNELLM_LIBNVRTC" ? real : null);
        Assert.That(overridden.Found, Is.True);
        Assert.That((overridden.LoadedName, overridden.Override, overridden.EnvironmentVariable), Is.EqualTo((real, real, "KERNELLM_LIBNVRTC")));
        Assert.That(overridden.Describe(), Does.Contain("(from KERNELLM_LIBNVRTC)"));

        var missing = NativeLibraries.Probe(NativeLibraries.Nvrtc, name => name == "KERNELLM_LIBNVRTC" ? "/nonexistent/libnvrtc.so.12" : null);
        Assert.That(missing.Found, Is.False, "a wrong override is an error, not a silent fallback to another NVRTC");
        Assert.That(missing.Attempts, Has.Count.EqualTo(1));
        Assert.That(missing.Describe(), Does.Contain("/nonexistent/libnvrtc.so.12").And.Contain("No such file"));
    }

    [Test]
    public void Versioned_names_are_probed_in_order_and_each_failure_is_recorded()
    {
        Assert.That(NativeLibraries.CandidateNames(NativeLibraries.Cuda), Is.EqualTo(new[] { "libcuda.so.1", "libcuda.so" }));
        Assert.That(NativeLibraries.CandidateNames(NativeLibraries.Nvrtc), Is.EqualTo(new[] { "libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so.11.2" }));
        Assert.That(NativeLibraries.CandidateNames(NativeLibraries.Cublas)[0], Is.EqualTo("libcublas.so.13"));
        Assert.That(NativeLibraries.CandidateNames(NativeLibraries.CublasLt)[0], Is.EqualTo("libcublasLt.so.13"));
        Assert.That(new[] { NativeLibraries.Cuda, NativeLibraries.Nvrtc, NativeLibraries.Cublas, NativeLibraries.CublasLt }.Select(NativeLibraries.EnvironmentVariableFor),
            Is.EqualTo(new[] { "KERNELLM_LIBCUDA", "KERNELLM_LIBNVRTC", "KERNELLM_LIBCUBLAS", "KERNELLM_LIBCUBLASLT" }));

        var cublas = NativeLibraries.Probe(NativeLibraries.Cublas, NoEnvironment);
        if (cublas.Found)
        {
            // Installed here: the probe names the file it loaded (one of the candidates).
            Assert.That(NativeLibraries.CandidateNames(NativeLibraries.Cublas).Any(name => cublas.Describe().Contains(name, StringComparison.Ordinal)), Is.True, cublas.Describe());
            return;
        }
        Assert.That(cublas.Attempts.Select(attempt => attempt[..attempt.IndexOf(':', StringComparison.Ordinal)]), Is.EqualTo(NativeLibraries.CandidateNames(NativeLibraries.Cublas)));
        Assert.That(cublas.Describe(), Does.StartWith("libcublas not found: tried libcublas.so.13, libcublas.so.12"));
    }

    [Test]
    public void Driver_errors_carry_the_enum_name_the_drivers_string_and_the_expression()
    {
        var error = Assert.Throws<CudaException>(() => Check.ThrowIfFailed(CUresult.CUDA_ERROR_OUT_OF_MEMORY))!;
        Assert.That(error.ErrorName, Is.EqualTo("CUDA_ERROR_OUT_OF_MEMORY"));
        Assert.That(error.Message, Does.StartWith("CUDA_ERROR_OUT_OF_MEMORY (").And.EndWith("from CUresult.CUDA_ERROR_OUT_OF_MEMORY"));
        if (NativeLibraries.Load(NativeLibraries.Cuda).Found)
        {
            Assert.That(error.Message, Does.Contain("(out of memory)"), "cuGetErrorString's text");
        }
        Assert.DoesNotThrow(() => Check.ThrowIfFailed(CUresult.CUDA_SUCCESS));
    }

    [Test]
    public void Nvrtc_and_cublas_errors_carry_their_names_and_the_expression()
    {
        var nvrtc = Assert.Throws<CudaException>(() => Check.ThrowIfFailed(nvrtcResult.NVRTC_ERROR_INVALID_OPTION))!;
        Assert.That(nvrtc.ErrorName, Is.EqualTo("NVRTC_ERROR_INVALID_OPTION"));
        Assert.That(nvrtc.Message, Does.Contain("NVRTC_ERROR_INVALID_OPTION").And.EndWith("from nvrtcResult.NVRTC_ERROR_INVALID_OPTION"));
        var cublas = Assert.Throws<CudaException>(() => Check.ThrowIfFailed(cublasStatus_t.CUBLAS_STATUS_ARCH_MISMATCH))!;
        Assert.That(cublas.ErrorName, Is.EqualTo("CUBLAS_STATUS_ARCH_MISMATCH"));
        Assert.That(cublas.Message, Does.EndWith("from cublasStatus_t.CUBLAS_STATUS_ARCH_MISMATCH"));
    }
}
