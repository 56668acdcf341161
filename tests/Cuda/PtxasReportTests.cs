using KernelLM.Runtime.Cuda.Driver;

namespace KernelLM.Tests.Cuda;

/// <summary>The ptxas report parser on logs as NVRTC 11.8 and 12+ write them (no NVRTC needed).</summary>
[TestFixture]
public sealed class PtxasReportTests
{
    [Test]
    public void Parses_entries_device_functions_registers_and_spills()
    {
        // NVRTC 12+ adds "used N barriers"; a non-inlined device function gets its own properties block.
        const string log = """
            ptxas info    : 0 bytes gmem
            ptxas info    : Function properties for _Z6helperf
            ptxas         .     8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
            ptxas info    : Compiling entry function 'rms_norm_bf16' for 'sm_90'
            ptxas info    : Function properties for rms_norm_bf16
            ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
            ptxas info    : Used 32 registers, used 1 barriers, 128 bytes smem, 380 bytes cmem[0]
            ptxas info    : Compiling entry function 'softmax_f32' for 'sm_90'
            ptxas info    : Function properties for softmax_f32
            ptxas         .     16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
            ptxas info    : Used 40 registers, 372 bytes cmem[0]
            """;
        var report = PtxasReport.Parse(log);
        Assert.That(report.Functions.Select(f => f.Name), Is.EqualTo(new[] { "_Z6helperf", "rms_norm_bf16", "softmax_f32" }));
        var helper = report.Functions[0];
        Assert.That(helper.IsEntry, Is.False);
        Assert.That((helper.StackFrameBytes, helper.SpillStoreBytes, helper.SpillLoadBytes), Is.EqualTo((8L, 4L, 4L)));
        var norm = report.Functions[1];
        Assert.That((norm.IsEntry, norm.Arch, norm.Registers, norm.SharedMemoryBytes, norm.Spills), Is.EqualTo((true, "sm_90", (int?)32, 128L, false)));
        var softmax = report.Functions[2];
        Assert.That((softmax.Registers, softmax.StackFrameBytes, softmax.SharedMemoryBytes), Is.EqualTo(((int?)40, 16L, 0L)));
        Assert.That(report.Spilling.Select(f => f.Name), Is.EqualTo(new[] { "_Z6helperf" }));
        Assert.That(report.ToString(), Does.Contain("rms_norm_bf16 sm_90: 32 registers, 0 B stack, 0 B spill stores, 0 B spill loads, 128 B static smem"));
    }

    [Test]
    public void An_empty_log_has_no_functions() => Assert.That(PtxasReport.Parse("").Functions, Is.Empty);
}
