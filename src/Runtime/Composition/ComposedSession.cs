using KernelLM.Runtime.Cuda;
using KernelLM.Runtime.Cuda.Ops;
using KernelLM.Runtime.Generation;
using KernelLM.Runtime.Signals;

namespace KernelLM.Runtime.Composition;

/// <summary>
/// One member of a <see cref="ComposedSession"/>: a model's session, the weight of its logits in the sum, and optionally
/// its own prompt, fed in place of the composition's prompt (the first forward after a reset); later tokens are fed to
/// every member alike. Guidance's unconditional sequence is a member with the negative prompt as its own.
/// </summary>
public sealed record ComposedMember(IDecoderSession Session, float Weight, int[]? Prompt = null);

/// <summary>
/// N models decoding in lockstep, each in its own session (its own KV cache), seen as one decoder whose logits are
/// the weighted sum of theirs (docs/composition.md):
///
///   composed[i] = sum_m w_m x_m[i]                  for i &lt; width (the shared vocabulary; padding rows left out)
///   with a plausibility cut (alpha &gt; 0, contrastive decoding):  composed[i] = -inf where p_0(i) &lt; alpha max_j p_0(j)
///
/// Because it is an <see cref="IDecoderSession"/>, everything downstream (the generation loop, its samplers, temperature,
/// the token signals and reports) sees the composed distribution, unchanged. The sum is <see cref="LogitSum"/> on the host;
/// when every member is a CUDA session on the same device with f32 or bf16 logits (<see cref="IDeviceLogits"/>), the
/// members' logits stay on the device, kernels/logit_sum.cu combines them there, and <see cref="ForwardSample"/> samples and
/// reduces the composed row there too (only the token id and its numbers come back). Buffers are allocated once here;
/// a decode step allocates nothing. The member sessions belong to the caller.
/// </summary>
public sealed class ComposedSession : IDecoderSession, IDeviceSampler
{
    /// <summary>Rows per member forward when every position's logits go through the host.</summary>
    private const int HostChunk = 16;

    private readonly ComposedMember[] _members;
    private readonly int[] _strides;             // per member: its vocabulary (row length of its logits)
    private readonly float _shift;               // log(alpha) of the plausibility cut; NaN when there is none
    private readonly float[][] _hostRows;        // per member [HostChunk, vocab_m] fp32 (host path)
    private readonly DevicePath? _device;
    private bool _fresh = true;
    private bool _disposed;

    /// <param name="members">The models, member 0 first (the backbone; the expert of contrastive decoding, whose
    /// probabilities the plausibility cut reads).</param>
    /// <param name="width">Columns of the composed row: the shared vocabulary, at most every member's
    /// <see cref="IDecoderSession.VocabularySize"/> (the LM heads may have padding rows past it).</param>
    /// <param name="plausibilityAlpha">0: no cut; in (0, 1]: keep only {i : p_0(i) &gt;= alpha max p_0} (the others are -inf).</param>
    public ComposedSession(IReadOnlyList<ComposedMember> members, int width, float plausibilityAlpha = 0)
    {
        ArgumentNullException.ThrowIfNull(members);
        if (members.Count == 0)
        {
            throw new InvalidParameterException("compose", "a composition needs at least one member");
        }
        if (!(plausibilityAlpha >= 0 && plausibilityAlpha <= 1))
        {
            throw new InvalidParameterException("contrastive-alpha", $"{plausibilityAlpha} (must be in (0, 1], or 0 for no plausibility cut)");
        }
        _members = [.. members];
        _strides = new int[_members.Length];
        for (int m = 0; m < _members.Length; m++)
        {
            var member = _members[m] ?? throw new ArgumentNullException(nameof(members), $"member {m} is null");
            ArgumentNullException.ThrowIfNull(member.Session);
            if (!float.IsFinite(member.Weight))
            {
                throw new InvalidParameterException("compose", $"member {m} has weight {member.Weight}; weights must be finite");
            }
            if (member.Prompt is { Length: 0 })
            {
                throw new InvalidParameterException("compose", $"member {m}'s own prompt encodes to no tokens");
            }
            _strides[m] = member.Session.VocabularySize;
            if (width < 1 || width > _strides[m])
            {
                throw new InvalidParameterException("compose", $"the composed vocabulary of {width} does not fit member {m}'s {_strides[m]} logits");
            }
        }
        VocabularySize = width;
        PlausibilityAlpha = plausibilityAlpha;
        _shift = plausibilityAlpha > 0 ? MathF.Log(plausibilityAlpha) : float.NaN;
        Capacity = _members.Min(m => m.Session.Capacity);
        _device = DevicePath.TryCreate(this);
        _hostRows = _device is null ? [.. _strides.Select(stride => new float[HostChunk * stride])] : [];
    }

    public int VocabularySize { get; }

    /// <summary>The smallest capacity of the members.</summary>
    public int Capacity { get; }

    /// <summary>The longest member sequence (a member with its own prompt may be ahead of the others).</summary>
    public int Length
    {
        get
        {
            int length = 0;
            foreach (var member in _members)
            {
                length = Math.Max(length, member.Session.Length);
            }
            return length;
        }
    }

    public IReadOnlyList<ComposedMember> Members => _members;

    public float PlausibilityAlpha { get; }

    /// <summary>Whether the members' logits are combined on their CUDA device (else on the host).</summary>
    public bool OnDevice => _device is not null;

    /// <summary>Device bytes of the composition's own buffers (0 on the host path).</summary>
    public long DeviceByteLength => _device?.ByteLength ?? 0;

    public void Reset()
    {
        foreach (var member in _members)
        {
            member.Session.Reset();
        }
        _device?.Reset();
        _fresh = true;
    }

    /// <summary>The tokens member <paramref name="m"/> runs: its own prompt in place of the first feed after a reset.</summary>
    private ReadOnlySpan<int> MemberTokens(int m, ReadOnlySpan<int> tokens) => _fresh && _members[m].Prompt is { } own ? own : tokens;

    private void CheckTokens(ReadOnlySpan<int> tokens, bool allPositions)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (tokens.IsEmpty)
        {
            throw new ArgumentException("forward needs at least one token", nameof(tokens));
        }
        foreach (int token in tokens)
        {
            if ((uint)token >= (uint)VocabularySize)
            {
                throw new InvalidParameterException("token", $"id {token} is outside the composed vocabulary of {VocabularySize}");
            }
        }
        if (allPositions && _fresh && _members.Any(m => m.Prompt is not null))
        {
            throw new InvalidOperationException("a member with its own prompt (guidance's unconditional sequence) has no rows for these tokens: "
                + "every position's logits need every member to run the same tokens");
        }
    }

    public void Forward(ReadOnlySpan<int> tokens, Span<float> logits, bool allPositions = false)
    {
        CheckTokens(tokens, allPositions);
        DecoderChecks.Logits(logits.Length, tokens.Length, VocabularySize, allPositions);
        if (_device is not null)
        {
            _device.Forward(tokens, logits, allPositions);
        }
        else if (allPositions)
        {
            for (int start = 0; start < tokens.Length; start += HostChunk)
            {
                int count = Math.Min(HostChunk, tokens.Length - start);
                for (int m = 0; m < _members.Length; m++)
                {
                    _members[m].Session.Forward(tokens.Slice(start, count), _hostRows[m].AsSpan(0, count * _strides[m]), allPositions: true);
                }
                CombineOnHost(logits.Slice(start * VocabularySize, count * VocabularySize), count);
            }
        }
        else
        {
            for (int m = 0; m < _members.Length; m++)
            {
                _members[m].Session.Forward(MemberTokens(m, tokens), _hostRows[m].AsSpan(0, _strides[m]));
            }
            CombineOnHost(logits[..VocabularySize], 1);
        }
        _fresh = false;
    }

    /// <summary>The rows in <c>_hostRows</c> summed into <paramref name="destination"/> [rows, width], then cut.</summary>
    private void CombineOnHost(Span<float> destination, int rows)
    {
        int width = VocabularySize;
        for (int m = 0; m < _members.Length; m++)
        {
            LogitSum.Accumulate(_hostRows[m], _strides[m], _members[m].Weight, destination, rows, width, first: m == 0);
        }
        if (PlausibilityAlpha > 0)
        {
            for (int r = 0; r < rows; r++)
            {
                var plausibility = _hostRows[0].AsSpan(r * _strides[0], width);
                LogitSum.Cut(plausibility, LogitSum.RowCutoff(plausibility, _shift), destination.Slice(r * width, width));
            }
        }
    }

    public bool CanSample => _device is not null;

    public int ForwardSample(ReadOnlySpan<int> feed, Sampling.SamplingOptions options, ulong seed, int topK, Span<float> stats, Span<int> topIds,
        Span<float> topLogProbs)
    {
        ArgumentNullException.ThrowIfNull(options);
        if (_device is null)
        {
            throw new InvalidOperationException("sampling on the device needs every member on one CUDA device with f32 or bf16 logits");
        }
        CheckTokens(feed, allPositions: false);
        int token = _device.ForwardSample(feed, options, seed, topK, stats, topIds, topLogProbs);
        _fresh = false;
        return token;
    }

    public void Dispose()
    {
        if (_disposed)
        {
            return;
        }
        _disposed = true;
        _device?.Dispose();
    }

    /// <summary>
    /// The composition on one CUDA device: the composed rows [chunk, width] f32, the plausibility cutoffs, and what
    /// sampling on the device needs (as a CUDA session's: the history, the penalty's scratch, the draw counter, the
    /// reduction's outputs), all allocated here once.
    /// </summary>
    private sealed class DevicePath : IDisposable
    {
        private readonly ComposedSession _owner;
        private readonly IDeviceLogits[] _sources;
        private readonly CudaDevice _device;
        private readonly int _chunk;
        private readonly LogitSumInput[] _inputs;
        private readonly List<DeviceTensor> _owned = [];
        private readonly DeviceTensor _composed;     // [chunk, width] f32
        private readonly DeviceTensor _composedRow;  // [1, width] view
        private readonly DeviceTensor? _cutoffs;     // [chunk] f32 (with a plausibility cut)
        private readonly DeviceTensor? _cutoffRow;   // [1] view
        private readonly DeviceRowSampler _sampler;  // penalty history, draw counter and the sampled row's numbers
        private int _fed;

        private DevicePath(ComposedSession owner, IDeviceLogits[] sources)
        {
            _owner = owner;
            _sources = sources;
            _device = sources[0].LogitsDevice;
            _chunk = sources.Min(s => s.LogitsChunk);
            _inputs = new LogitSumInput[sources.Length];
            int width = owner.VocabularySize;
            try
            {
                _composed = Allocate("composed_logits", DType.F32, _chunk, width);
                _composedRow = _composed.View("composed_logits", DType.F32, 0, 1, width);
                if (owner.PlausibilityAlpha > 0)
                {
                    _cutoffs = Allocate("plausibility_cutoffs", DType.F32, _chunk);
                    _cutoffRow = _cutoffs.View("plausibility_cutoffs", DType.F32, 0, 1);
                }
                _sampler = new DeviceRowSampler(_device, DType.F32, width, owner.Capacity, (name, type, shape) => Allocate("composed_" + name, type, shape));
                Reset();
            }
            catch
            {
                Dispose();
                throw;
            }
        }

        /// <summary>The device path when every member keeps f32 or bf16 logits (all one dtype) on one device; else null.</summary>
        public static DevicePath? TryCreate(ComposedSession owner)
        {
            var sources = new IDeviceLogits[owner._members.Length];
            for (int m = 0; m < sources.Length; m++)
            {
                if (owner._members[m].Session is not IDeviceLogits source || source.LogitsDType is not (DType.F32 or DType.BF16)
                    || (m > 0 && (!ReferenceEquals(source.LogitsDevice, sources[0].LogitsDevice) || source.LogitsDType != sources[0].LogitsDType)))
                {
                    return null;
                }
                sources[m] = source;
            }
            return new DevicePath(owner, sources);
        }

        public long ByteLength => _owned.Sum(t => t.ByteLength);

        private DeviceTensor Allocate(string name, DType dtype, params int[] shape)
        {
            var tensor = DeviceMemory.Allocate(_device, name, dtype, shape, $"after {ByteLength:N0} bytes of the composition's buffers");
            _owned.Add(tensor);
            return tensor;
        }

        public void Reset()
        {
            _fed = 0;
            _sampler.SetDrawCounter(0);
        }

        /// <summary>Each member's forward, its logits left on the device, summed (and cut) into <paramref name="output"/>.</summary>
        private void Combine(ReadOnlySpan<int> tokens, bool allPositions, DeviceTensor output, DeviceTensor? cutoff)
        {
            int width = _owner.VocabularySize;
            for (int m = 0; m < _sources.Length; m++)
            {
                var logits = _sources[m].ForwardToDevice(allPositions ? tokens : _owner.MemberTokens(m, tokens), allPositions);
                _inputs[m] = new LogitSumInput(logits, _owner._strides[m], _owner._members[m].Weight);
            }
            if (cutoff is not null)
            {
                CudaOps.LogitRowMax(_device, _inputs[0].Logits, _owner._strides[0], width, _owner._shift, cutoff);
            }
            CudaOps.LogitSum(_device, _inputs, width, cutoff, output);
            for (int m = 0; m < _inputs.Length; m++)
            {
                _inputs[m] = default; // no view kept past the call
            }
        }

        public void Forward(ReadOnlySpan<int> tokens, Span<float> logits, bool allPositions)
        {
            int width = _owner.VocabularySize;
            if (!allPositions)
            {
                Combine(tokens, false, _composedRow, _cutoffRow);
                _composedRow.Download(logits[..width]);
            }
            else
            {
                for (int start = 0; start < tokens.Length; start += _chunk)
                {
                    int count = Math.Min(_chunk, tokens.Length - start);
                    var rows = count == 1 ? _composedRow : _composed.View("composed_logits", DType.F32, 0, count, width);
                    var cutoffs = _cutoffs is null ? null : count == 1 ? _cutoffRow : _cutoffs.View("plausibility_cutoffs", DType.F32, 0, count);
                    Combine(tokens.Slice(start, count), true, rows, cutoffs);
                    rows.Download(logits.Slice(start * width, count * width));
                }
            }
            Record(tokens);
        }

        /// <summary>Adds the fed tokens to the device history the repetition penalty reads.</summary>
        private void Record(ReadOnlySpan<int> tokens)
        {
            _sampler.Record(_fed, tokens);
            _fed = Math.Min(_fed + tokens.Length, _owner.Capacity);
        }

        public int ForwardSample(ReadOnlySpan<int> feed, Sampling.SamplingOptions options, ulong seed, int topK, Span<float> stats, Span<int> topIds,
            Span<float> topLogProbs)
        {
            DeviceRowSampler.CheckOutputs(topK, stats, topIds, topLogProbs);
            Combine(feed, false, _composedRow, _cutoffRow);
            Record(feed);
            // The numbers of the composed distribution (before penalty and temperature) for the chosen id.
            return _sampler.Sample(_composedRow, options, seed, topK, stats, topIds, topLogProbs);
        }

        public void Dispose()
        {
            foreach (var tensor in _owned)
            {
                tensor.Dispose();
            }
            _owned.Clear();
        }
    }
}
