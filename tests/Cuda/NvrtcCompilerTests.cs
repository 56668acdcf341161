using System.Globalization;
using System.Text;
using KernelLM.Runtime.Cuda;
using KernelLM.Runtime.Cuda.Driver;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.Cuda;

/// <summary>
/// NVRTC without a GPU: every kernel file compiles for the architectures we ship for (sm_80, sm_90), with no
/// register spills unless allow-listed; compile errors carry the log and the file name. NVRTC is required:
/// on a machine without it these tests fail and say how to install it.
/// </summary>
[TestFixture]
public sealed class NvrtcCompilerTests
{
    /// <summary>The architectures CI compiles every kernel for: A100 (sm_80) and H100/H200 (sm_90).</summary>
    private static readonly string[] ShippedArchs = ["sm_80", "sm_90"];

    /// <summary>Entry points allowed to spill registers, each with the reason. Add one only with a measurement that
    /// the spill costs less than the alternative (in the commit message).</summary>
    private static readonly Dictionary<string, string> SpillAllowList = new(StringComparer.Ordinal)
    {
    };

    [SetUp]
    public void RequireNvrtc() => CudaTestSupport.RequireNvrtc();

    [Test]
    public void Nvrtc_reports_its_version_and_compiles_for_sm_80_and_sm_90()
    {
        var info = NvrtcCompiler.Info;
        TestContext.Out.WriteLine($"NVRTC {info.Version} ({info.Library.Describe()}; builtins: {info.Builtins?.Describe() ?? "not preloaded"})");
        TestContext.Out.WriteLine($"supported: {string.Join(", ", info.SupportedArchs)}");
        Assert.That(info.Major * 10 + info.Minor, Is.GreaterThanOrEqualTo(112), "NVRTC 11.2 or later (nvrtcGetSupportedArchs, CUBIN output)");
        Assert.That(info.SupportedArchs, Does.Contain(80).And.Contain(90));
        Assert.That(info.Identity, Does.StartWith(info.Version + " libnvrtc"));
    }

    [Test]
    public void Target_is_the_exact_sm_when_supported_else_ptx_for_the_newest_older_arch()
    {
        Assert.That(NvrtcCompiler.TargetFor(80), Is.EqualTo("sm_80"));
        Assert.That(NvrtcCompiler.TargetFor(90), Is.EqualTo("sm_90"));
        int newest = NvrtcCompiler.Info.SupportedArchs.Max();
        Assert.That(NvrtcCompiler.TargetFor(newest + 1), Is.EqualTo($"compute_{newest}"), "a device newer than NVRTC gets PTX the driver JIT-compiles");
        Assert.That(() => NvrtcCompiler.TargetFor(10), Throws.TypeOf<CudaException>().With.Message.Contains("cannot compile for compute capability 1.0"));
    }

    [TestCase("sm_80")]
    [TestCase("sm_90")]
    public void Test_kernels_with_common_cuh_compile_to_a_cubin_without_spills(string arch)
    {
        var compiled = NvrtcCompiler.Compile(CudaTestSupport.TestKernels, arch, verbose: true);
        Print(compiled);
        Assert.That(compiled.Kind, Is.EqualTo(KernelImageKind.Cubin));
        Assert.That(compiled.Image.AsSpan(0, 4).ToArray(), Is.EqualTo("\x7f"u8.ToArray().Concat("ELF"u8.ToArray()).ToArray()), "a CUBIN is an ELF file");
        Assert.That(compiled.Options, Does.Contain($"-arch={arch}").And.Contain("-std=c++17").And.Contain("--ptxas-options=-v"));
        var report = compiled.Report;
        Assert.That(report.Functions.Where(f => f.IsEntry).Select(f => f.Name),
            Is.EquivalentTo(new[] { "scale_bf16_f32", "round_f32_bf16", "row_sum_f32", "shared_echo_f32" }), "the ptxas report names every entry point");
        Assert.That(report.Functions.Where(f => f.IsEntry).Select(f => f.Arch), Is.All.EqualTo(arch));
        Assert.That(report.Functions.Where(f => f.IsEntry).Select(f => f.Registers), Is.All.Not.Null);
        Assert.That(report.Spilling, Is.Empty, compiled.Log);
    }

    [Test]
    public void Compute_targets_give_nul_terminated_ptx()
    {
        var compiled = NvrtcCompiler.Compile(CudaTestSupport.TestKernels, "compute_80");
        Assert.That(compiled.Kind, Is.EqualTo(KernelImageKind.Ptx));
        Assert.That(compiled.Image[^1], Is.Zero, "cuModuleLoadData needs the terminating NUL");
        string ptx = Encoding.ASCII.GetString(compiled.Image, 0, compiled.Image.Length - 1);
        Assert.That(ptx, Does.Contain(".target sm_80").And.Contain(".entry row_sum_f32"));
        Assert.That(compiled.Options, Does.Not.Contain("--ptxas-options=-v"), "ptxas does not run for a virtual architecture");
    }

    [Test]
    public void Every_embedded_kernel_file_compiles_for_sm_80_and_sm_90_without_spills()
    {
        string[] onDisk = Directory.GetFiles(Path.Combine(TestPaths.RepositoryRoot, "kernels"), "*.cu").Select(Path.GetFileName).Order(StringComparer.Ordinal).ToArray()!;
        Assert.That(KernelSources.All.Select(source => source.FileName), Is.EqualTo(onDisk), "every kernels/*.cu is embedded");
        Assert.That(KernelSources.Headers.Keys, Does.Contain("common.cuh"));
        if (KernelSources.All.Count == 0)
        {
            TestContext.Out.WriteLine("kernels/ has no .cu file yet: common.cuh is compiled by the test kernels");
        }
        var spills = new List<string>();
        var report = new System.Text.StringBuilder();
        foreach (var source in KernelSources.All)
        {
            foreach (string arch in ShippedArchs)
            {
                var compiled = NvrtcCompiler.Compile(source, arch, verbose: true);
                report.Append(Print(compiled));
                Assert.That(compiled.Report.Functions.Where(f => f.IsEntry).Select(f => f.Name), Is.SupersetOf(source.EntryPoints),
                    $"{source.FileName} ({arch}): ptxas compiled every extern \"C\" entry point");
                spills.AddRange(compiled.Report.Spilling.Where(function => !SpillAllowList.ContainsKey(function.Name))
                    .Select(function => $"{source.FileName} {function}"));
            }
        }
        // .ci/run prints this file after the tests: the register / spill report of every shipped kernel.
        string artifacts = Path.Combine(TestPaths.RepositoryRoot, "artifacts");
        Directory.CreateDirectory(artifacts);
        File.WriteAllText(Path.Combine(artifacts, "ptxas-report.txt"), $"NVRTC {NvrtcCompiler.Info.Version}\n{report}");
        Assert.That(spills, Is.Empty, "register spills (fix the kernel, or allow-list it in SpillAllowList with a reason)");
    }

    [Test]
    public void The_spill_gate_fires_on_a_kernel_that_spills()
    {
        // 48 live accumulators squeezed into 24 registers: ptxas must spill.
        const string text = """
            extern "C" __global__ void register_pressure_f32(const float* x, float* y, int n) {
                float acc[48];
                #pragma unroll
                for (int i = 0; i < 48; i++) acc[i] = x[threadIdx.x + i * n];
                #pragma unroll
                for (int r = 1; r < 5; r++) {
                    #pragma unroll
                    for (int i = 0; i < 48; i++) acc[i] = fmaf(acc[i], acc[(i + r) % 48], 1.0f);
                }
                float sum = 0.0f;
                #pragma unroll
                for (int i = 0; i < 48; i++) sum += acc[i] * (float)(i + 1);
                y[threadIdx.x] = sum;
            }
            """;
        var source = new KernelSource("register_pressure.cu", text, new Dictionary<string, string>());
        var relaxed = NvrtcCompiler.Compile(source, "sm_80", verbose: true);
        var squeezed = NvrtcCompiler.Compile(source, "sm_80", verbose: true, extraOptions: ["-maxrregcount=24"]);
        Print(squeezed);
        Assert.That(relaxed.Report.HasSpills, Is.False, relaxed.Log);
        var function = squeezed.Report.Functions.Single();
        Assert.That(function.Name, Is.EqualTo("register_pressure_f32"));
        Assert.That(function.Registers, Is.LessThanOrEqualTo(24));
        Assert.That(function.SpillStoreBytes, Is.GreaterThan(0), squeezed.Log);
        Assert.That(function.SpillLoadBytes, Is.GreaterThan(0), squeezed.Log);
        Assert.That(squeezed.Report.HasSpills, Is.True);
    }

    [Test]
    public void A_compile_error_carries_the_nvrtc_log_and_the_file_name()
    {
        const string text = """
            #include "common.cuh"
            extern "C" __global__ void broken_f32(float* y) {
                y[threadIdx.x] = undeclared_value;
            }
            """;
        var source = new KernelSource("broken.cu", text, KernelSources.Headers);
        var error = Assert.Throws<CudaException>(() => NvrtcCompiler.Compile(source, "sm_90"))!;
        TestContext.Out.WriteLine(error.Message);
        Assert.That(error.ErrorName, Is.EqualTo("NVRTC_ERROR_COMPILATION"));
        Assert.That(error.FileName, Is.EqualTo("broken.cu"));
        Assert.That(error.CompilerLog, Does.Contain("broken.cu(3)").And.Contain("undeclared_value"));
        Assert.That(error.Message, Does.StartWith("broken.cu: ").And.Contain(error.CompilerLog!).And.Contain("sm_90"));
    }

    [Test]
    public void A_missing_header_is_a_compile_error_naming_it()
    {
        var source = new KernelSource("needs_header.cu", "#include \"missing.cuh\"\nextern \"C\" __global__ void f() {}\n", new Dictionary<string, string>());
        var error = Assert.Throws<CudaException>(() => NvrtcCompiler.Compile(source, "sm_80"))!;
        Assert.That(error.CompilerLog, Does.Contain("missing.cuh"));
        Assert.That(error.FileName, Is.EqualTo("needs_header.cu"));
    }

    [Test]
    public void A_bad_option_is_reported_with_the_options()
    {
        var error = Assert.Throws<CudaException>(() => NvrtcCompiler.Compile(CudaTestSupport.TestKernels, "sm_80", extraOptions: ["--no-such-option"]))!;
        Assert.That(error.ErrorName, Is.EqualTo("NVRTC_ERROR_INVALID_OPTION"));
        Assert.That(error.Message, Does.Contain("--no-such-option").And.Contain("test_kernels.cu"));
    }

    [TestCase("sm90")]
    [TestCase("90")]
    [TestCase("-arch=sm_90")]
    public void Architectures_are_sm_or_compute_names(string arch) =>
        Assert.That(() => NvrtcCompiler.Compile(CudaTestSupport.TestKernels, arch), Throws.ArgumentException.With.Message.Contains(arch));

    private static string Print(CompiledKernel compiled)
    {
        var text = new System.Text.StringBuilder();
        text.AppendLine(string.Create(CultureInfo.InvariantCulture,
            $"{compiled.FileName} {compiled.Arch}: {compiled.Image.Length} B {compiled.Kind} in {compiled.CompileTime.TotalMilliseconds:F0} ms"));
        foreach (var function in compiled.Report.Functions)
        {
            text.AppendLine($"  {function}");
        }
        TestContext.Out.Write(text.ToString());
        return text.ToString();
    }
}
