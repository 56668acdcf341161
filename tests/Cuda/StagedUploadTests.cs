using KernelLM.Runtime;
using KernelLM.Runtime.Cuda;
using KernelLM.Runtime.Cuda.Emulator;

namespace KernelLM.Tests.Cuda;

/// <summary>
/// Uploads through page-locked staging buffers on the emulated device, whose copies from pinned memory read their
/// source only when they are drained (as a DMA would, later): every byte lands, buffers are reused only after the
/// copy that read them, and everything is freed.
/// </summary>
[TestFixture]
public sealed class StagedUploadTests
{
    private CudaDevice _device = null!;

    private EmulatorBackend Backend => (EmulatorBackend)_device.Backend;

    [OneTimeSetUp]
    public void CreateDevice() => _device = new CudaDevice(new EmulatorBackend(), []);

    [OneTimeTearDown]
    public void DisposeDevice() => _device.Dispose();

    [TearDown]
    public void NothingLeaks()
    {
        Assert.That(Backend.LivePinnedBuffers, Is.Zero, "pinned buffers leaked");
        Assert.That(Backend.LiveAllocations, Is.Zero, "device allocations leaked");
    }

    [TestCase(1000, 4096, 2)]
    [TestCase(100_000, 4096, 2)]    // 25 pieces through 2 buffers
    [TestCase(100_000, 3000, 3)]    // pieces not a multiple of the page
    [TestCase(8192, 4096, 1)]       // one buffer: every piece waits for the previous
    public void Every_byte_lands_whatever_the_piece_and_buffer_count(int bytes, int bufferBytes, int buffers)
    {
        var random = new Random(bytes + bufferBytes);
        var first = new byte[bytes];
        var second = new byte[bytes / 3 + 1];
        random.NextBytes(first);
        random.NextBytes(second);
        using var a = _device.Allocate("a", DType.I32, (bytes + 3) / 4);
        using var b = _device.Allocate("b", DType.I32, (second.Length + 3) / 4);
        using (var upload = new StagedUpload(_device, bufferBytes, buffers))
        {
            upload.Copy(a.Address, first);
            upload.Copy(b.Address, second);
            upload.Finish();
            Assert.That(upload.Bytes, Is.EqualTo(first.Length + second.Length));
            Assert.That(upload.Pieces, Is.EqualTo((bytes + bufferBytes - 1) / bufferBytes + (second.Length + bufferBytes - 1) / bufferBytes));
        }
        Assert.That(a.Download<byte>()[..bytes], Is.EqualTo(first));
        Assert.That(b.Download<byte>()[..second.Length], Is.EqualTo(second));
    }

    /// <summary>What the staging protects against: rewriting a pinned buffer before its copy has been waited for
    /// uploads the new bytes (the emulator reads the source when it drains, as the DMA engine would).</summary>
    [Test]
    public unsafe void A_pinned_buffer_rewritten_before_its_copy_is_waited_for_uploads_the_new_bytes()
    {
        using var target = _device.Allocate("t", DType.I32, 4);
        nint stream = Backend.CreateStream();
        nint pinned = Backend.AllocatePinned(16);
        try
        {
            var span = new Span<byte>((void*)pinned, 16);
            span.Fill(1);
            Backend.CopyPinnedToDevice(target.Address, pinned, 16, stream);
            span.Fill(2);   // too early
            Backend.Synchronize(stream);
            Assert.That(target.Download<byte>(), Is.All.EqualTo((byte)2));

            span.Fill(3);
            Backend.CopyPinnedToDevice(target.Address, pinned, 16, stream);
            Backend.SynchronizeEvent(Backend.RecordEvent(stream));
            span.Fill(4);   // after the wait: does not matter
            Assert.That(target.Download<byte>(), Is.All.EqualTo((byte)3));
            Assert.That(() => Backend.CopyPinnedToDevice(target.Address, pinned + 8, 16, stream),
                Throws.TypeOf<CudaException>().With.Message.Contain("not inside a page-locked buffer"));
        }
        finally
        {
            Backend.FreePinned(pinned);
            Backend.DestroyStream(stream);
        }
    }
}
