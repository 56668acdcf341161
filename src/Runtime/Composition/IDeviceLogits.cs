using KernelLM.Runtime.Cuda;

namespace KernelLM.Runtime.Composition;

/// <summary>
/// A session on a CUDA device that can run a forward pass and leave its logits on the device, so that a composition
/// of several such sessions on one device combines their rows there (kernels/logit_sum.cu) and only the chosen token
/// and its numbers come back.
/// </summary>
public interface IDeviceLogits
{
    /// <summary>The device the logits live on.</summary>
    CudaDevice LogitsDevice { get; }

    /// <summary>The dtype of the logits tensor (the model's activation dtype).</summary>
    DType LogitsDType { get; }

    /// <summary>Most rows <see cref="ForwardToDevice"/> returns with every position's logits (the prefill chunk).</summary>
    int LogitsChunk { get; }

    /// <summary>
    /// Runs <paramref name="tokens"/> like <see cref="Generation.IDecoderSession.Forward"/> and returns the logits on the
    /// device: [1, vocabulary] for the last token, or [tokens, vocabulary] when <paramref name="allPositions"/> (then at most
    /// <see cref="LogitsChunk"/> tokens). A view of the session's own buffer, valid until its next forward.
    /// </summary>
    DeviceTensor ForwardToDevice(ReadOnlySpan<int> tokens, bool allPositions);
}
