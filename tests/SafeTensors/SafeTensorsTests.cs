using System.Buffers.Binary;
using System.Diagnostics;
using System.Text;
using KernelLM.Models.Llama;
using KernelLM.Runtime;
using KernelLM.Runtime.SafeTensors;
using KernelLM.Tests.Fixtures;
using KernelLM.Tests.Support;
using NUnit.Framework;

namespace KernelLM.Tests.SafeTensors;

[TestFixture]
public sealed class SafeTensorsTests
{
    // Exactly representable in F32, F16 and BF16 (at most 8 significant bits, within F16's range), so
    // every dtype must read them back bit for bit; the reader is tested, not the rounding.
    private static readonly float[] ExactValues = [0f, 1f, -2.5f, 0.15625f, 1024f, -0.0078125f, 3.5f, 57344f, -0.375f, 96f, 6.103515625e-05f, -1.75f];

    private string _directory = "";

    [SetUp]
    public void CreateDirectory()
    {
        _directory = TestPaths.NewTemporaryDirectory("safetensors");
    }

    [TearDown]
    public void DeleteDirectory() => Directory.Delete(_directory, recursive: true);

    private string PathOf(string fileName) => Path.Combine(_directory, fileName);

    // ---------------------------------------------------------------- valid files

    [TestCase(DType.F32, TestName = "safetensors_round_trip(F32)")]
    [TestCase(DType.F16, TestName = "safetensors_round_trip(F16)")]
    [TestCase(DType.BF16, TestName = "safetensors_round_trip(BF16)")]
    public void RoundTrip(DType dtype)
    {
        string path = PathOf("model.safetensors");
        float[] matrix = ExactValues;
        float[] vector = [.. ExactValues.Take(5).Select(value => -value)];
        var metadata = new Dictionary<string, string> { ["format"] = "pt", ["note"] = "written by the tests" };
        SafeTensorsWriter.Write(path,
        [
            ("first.vector", dtype, [5], SafeTensorsWriter.Encode(dtype, vector)),
            ("second.matrix", dtype, [3, 4], SafeTensorsWriter.Encode(dtype, matrix)),
            ("empty", dtype, [0, 4], []),
            ("scalar", dtype, [], SafeTensorsWriter.Encode(dtype, [42f])),
        ], metadata);

        using var file = SafeTensorsFile.Open(path);
        var matrixView = file.GetTensor("second.matrix");
        var vectorView = file.GetTensor("first.vector");
        var emptyView = file.GetTensor("empty");
        var scalarView = file.GetTensor("scalar");
        using (Assert.EnterMultipleScope())
        {
            Assert.That(file.TensorNames, Is.EquivalentTo(Values("first.vector", "second.matrix", "empty", "scalar")));
            Assert.That(file.Metadata, Is.EquivalentTo(metadata));
            Assert.That(file.FileLength, Is.EqualTo(new FileInfo(path).Length));
            Assert.That(matrixView.DType, Is.EqualTo(dtype));
            Assert.That(matrixView.Shape, Is.EqualTo(Values(3, 4)));
            Assert.That(matrixView.ElementCount, Is.EqualTo(12));
            Assert.That(matrixView.ByteLength, Is.EqualTo(12 * dtype.SizeOf()));
            Assert.That(matrixView.ToFloatArray(), Is.EqualTo(matrix));
            Assert.That(Enumerable.Range(0, 12).Select(i => matrixView.GetFloat(i)), Is.EqualTo(matrix));
            Assert.That(vectorView.ToFloatArray(), Is.EqualTo(vector));
            Assert.That(vectorView.GetFloat(1), Is.EqualTo(-1f));
            Assert.That(emptyView.ElementCount, Is.Zero);
            Assert.That(emptyView.ToFloatArray(), Is.Empty);
            Assert.That(scalarView.Rank, Is.Zero);
            Assert.That(scalarView.ToFloatArray(), Is.EqualTo(Values(42f)));
        }
    }

    [TestCase(DType.F16, TestName = "safetensors_round_trip_rounds_like_the_dtype(F16)")]
    [TestCase(DType.BF16, TestName = "safetensors_round_trip_rounds_like_the_dtype(BF16)")]
    public void RoundTripRounding(DType dtype)
    {
        // Values that are not representable: what comes back must be the dtype's nearest value, and the
        // tolerance is that dtype's half-ulp (2^-11 for F16, 2^-8 for BF16), relative.
        var random = new Random(7);
        float[] values = [.. Enumerable.Range(0, 257).Select(_ => (float)((random.NextDouble() - 0.5) * 20))];
        string path = PathOf("model.safetensors");
        SafeTensorsWriter.Write(path, [("values", dtype, [values.Length], SafeTensorsWriter.Encode(dtype, values))]);

        using var file = SafeTensorsFile.Open(path);
        float[] actual = file.GetTensor("values").ToFloatArray();
        double halfUlp = dtype == DType.F16 ? Math.Pow(2, -11) : Math.Pow(2, -8);
        for (int i = 0; i < values.Length; i++)
        {
            Assert.That(actual[i], Is.EqualTo(values[i]).Within(Math.Abs(values[i]) * halfUlp + 1e-7), $"element {i}");
        }
    }

    [Test]
    public void safetensors_reads_the_tiny_stories_checkpoint()
    {
        using var file = SafeTensorsFile.Open(Path.Combine(TestPaths.TinyStories, "model.safetensors"));
        var embedding = file.GetTensor("model.embed_tokens.weight");
        using (Assert.EnterMultipleScope())
        {
            Assert.That(embedding.DType, Is.EqualTo(DType.BF16));
            Assert.That(embedding.Shape, Is.EqualTo(Values(2048, 256)));
            // 6 layers x 9 tensors + embedding + final norm; tied, so no lm_head.
            Assert.That(file.TensorNames, Has.Count.EqualTo(6 * 9 + 2));
            Assert.That(file.Contains("lm_head.weight"), Is.False);
        }
    }

    [Test]
    public void safetensors_archive_opens_a_sharded_folder_through_its_index()
    {
        SafeTensorsWriter.Write(PathOf("model-00001-of-00002.safetensors"),
            [("a", DType.F32, [2], SafeTensorsWriter.EncodeF32([1f, 2f])), ("b", DType.BF16, [3], SafeTensorsWriter.EncodeBF16([3f, 4f, 5f]))]);
        SafeTensorsWriter.Write(PathOf("model-00002-of-00002.safetensors"),
            [("c", DType.F16, [1, 2], SafeTensorsWriter.EncodeF16([6f, 7f]))]);
        WriteIndex(("a", "model-00001-of-00002.safetensors"), ("b", "model-00001-of-00002.safetensors"), ("c", "model-00002-of-00002.safetensors"));

        using var archive = SafeTensorsArchive.Open(_directory);
        using (Assert.EnterMultipleScope())
        {
            Assert.That(archive.Files, Has.Count.EqualTo(2));
            Assert.That(archive.Tensors.Keys, Is.EquivalentTo(Values("a", "b", "c")));
            Assert.That(archive.Tensors["a"].ToFloatArray(), Is.EqualTo(Values(1f, 2f)));
            Assert.That(archive.Tensors["b"].ToFloatArray(), Is.EqualTo(Values(3f, 4f, 5f)));
            Assert.That(archive.TryGetTensor("c", out var c), Is.True);
            Assert.That(c.Shape, Is.EqualTo(Values(1, 2)));
            Assert.That(c.ToFloatArray(), Is.EqualTo(Values(6f, 7f)));
            Assert.That(archive.DataBytes, Is.EqualTo(8 + 6 + 4));
        }
    }

    [Test]
    public void safetensors_archive_without_index_reads_every_file_of_the_folder()
    {
        SafeTensorsWriter.Write(PathOf("part-b.safetensors"), [("b", DType.F32, [1], SafeTensorsWriter.EncodeF32([2f]))]);
        SafeTensorsWriter.Write(PathOf("part-a.safetensors"), [("a", DType.F32, [1], SafeTensorsWriter.EncodeF32([1f]))]);

        using var archive = SafeTensorsArchive.Open(_directory);
        Assert.That(archive.Tensors.Keys, Is.EquivalentTo(Values("a", "b")));
    }


    // ---------------------------------------------------------------- archive errors

    [Test]
    public void safetensors_archive_rejects_an_index_that_maps_a_tensor_to_a_shard_lacking_it()
    {
        SafeTensorsWriter.Write(PathOf("model-00001-of-00002.safetensors"), [("a", DType.F32, [1], SafeTensorsWriter.EncodeF32([1f]))]);
        SafeTensorsWriter.Write(PathOf("model-00002-of-00002.safetensors"), [("b", DType.F32, [1], SafeTensorsWriter.EncodeF32([2f]))]);
        // "b" lives in the second shard, the index says the first.
        WriteIndex(("a", "model-00001-of-00002.safetensors"), ("b", "model-00001-of-00002.safetensors"));

        var error = Assert.Throws<SafeTensorsException>(() => SafeTensorsArchive.Open(_directory).Dispose());
        AssertNames(error, SafeTensorsError.MissingTensor, PathOf("model-00001-of-00002.safetensors"), "b");
        AssertNothingMapped();
    }

    [Test]
    public void safetensors_archive_rejects_an_index_that_lists_a_tensor_no_shard_holds()
    {
        SafeTensorsWriter.Write(PathOf("model-00001-of-00001.safetensors"), [("a", DType.F32, [1], SafeTensorsWriter.EncodeF32([1f]))]);
        WriteIndex(("a", "model-00001-of-00001.safetensors"), ("ghost", "model-00001-of-00001.safetensors"));

        var error = Assert.Throws<SafeTensorsException>(() => SafeTensorsArchive.Open(_directory).Dispose());
        AssertNames(error, SafeTensorsError.MissingTensor, PathOf("model-00001-of-00001.safetensors"), "ghost");
    }

    [Test]
    public void safetensors_archive_rejects_an_index_naming_a_missing_shard()
    {
        SafeTensorsWriter.Write(PathOf("model-00001-of-00002.safetensors"), [("a", DType.F32, [1], SafeTensorsWriter.EncodeF32([1f]))]);
        WriteIndex(("a", "model-00001-of-00002.safetensors"), ("b", "model-00002-of-00002.safetensors"));

        var error = Assert.Throws<SafeTensorsException>(() => SafeTensorsArchive.Open(_directory).Dispose());
        AssertNames(error, SafeTensorsError.FileNotFound, PathOf("model-00002-of-00002.safetensors"), null);
        AssertNothingMapped();
    }

    [Test]
    public void safetensors_archive_rejects_an_index_that_is_not_json()
    {
        SafeTensorsWriter.Write(PathOf("model-00001-of-00001.safetensors"), [("a", DType.F32, [1], SafeTensorsWriter.EncodeF32([1f]))]);
        File.WriteAllText(PathOf(SafeTensorsArchive.IndexFileName), "{\"weight_map\": {\"a\": ");

        var error = Assert.Throws<SafeTensorsException>(() => SafeTensorsArchive.Open(_directory).Dispose());
        AssertNames(error, SafeTensorsError.InvalidIndex, PathOf(SafeTensorsArchive.IndexFileName), null);
    }

    [Test]
    public void safetensors_archive_rejects_an_index_without_weight_map()
    {
        File.WriteAllText(PathOf(SafeTensorsArchive.IndexFileName), "{\"metadata\": {}}");

        var error = Assert.Throws<SafeTensorsException>(() => SafeTensorsArchive.Open(_directory).Dispose());
        AssertNames(error, SafeTensorsError.InvalidIndex, PathOf(SafeTensorsArchive.IndexFileName), null);
    }

    [Test]
    public void safetensors_archive_rejects_an_index_pointing_outside_the_folder()
    {
        WriteIndex(("a", "../elsewhere.safetensors"));

        var error = Assert.Throws<SafeTensorsException>(() => SafeTensorsArchive.Open(_directory).Dispose());
        AssertNames(error, SafeTensorsError.InvalidIndex, PathOf(SafeTensorsArchive.IndexFileName), "a");
    }

    [Test]
    public void safetensors_archive_rejects_a_tensor_stored_in_two_files()
    {
        SafeTensorsWriter.Write(PathOf("part-a.safetensors"), [("same", DType.F32, [1], SafeTensorsWriter.EncodeF32([1f]))]);
        SafeTensorsWriter.Write(PathOf("part-b.safetensors"), [("same", DType.F32, [1], SafeTensorsWriter.EncodeF32([2f]))]);

        var error = Assert.Throws<SafeTensorsException>(() => SafeTensorsArchive.Open(_directory).Dispose());
        AssertNames(error, SafeTensorsError.DuplicateTensor, PathOf("part-b.safetensors"), "same");
        Assert.That(error.Message, Does.Contain("part-a.safetensors"));
        AssertNothingMapped();
    }

    [Test]
    public void safetensors_archive_rejects_a_folder_without_safetensors()
    {
        var error = Assert.Throws<SafeTensorsException>(() => SafeTensorsArchive.Open(_directory).Dispose());
        AssertNames(error, SafeTensorsError.FileNotFound, _directory, null);
    }

    [Test]
    public void safetensors_archive_rejects_a_missing_folder()
    {
        string missing = PathOf("no-such-model");
        var error = Assert.Throws<SafeTensorsException>(() => SafeTensorsArchive.Open(missing).Dispose());
        AssertNames(error, SafeTensorsError.FileNotFound, missing, null);
    }

    [Test]
    public void safetensors_archive_unmaps_good_shards_when_a_later_shard_is_malformed()
    {
        SafeTensorsWriter.Write(PathOf("model-00001-of-00002.safetensors"), [("a", DType.F32, [1], SafeTensorsWriter.EncodeF32([1f]))]);
        WriteTruncated(PathOf("model-00002-of-00002.safetensors"));
        WriteIndex(("a", "model-00001-of-00002.safetensors"), ("second", "model-00002-of-00002.safetensors"));

        var error = Assert.Throws<SafeTensorsException>(() => SafeTensorsArchive.Open(_directory).Dispose());
        AssertNames(error, SafeTensorsError.InvalidOffsets, PathOf("model-00002-of-00002.safetensors"), "second");
        // The first shard was mapped before the second failed; the archive must have released it.
        AssertNothingMapped();
    }

    // ---------------------------------------------------------------- malformed files

    private static readonly string ValidEntry = "{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}";

    private static IEnumerable<TestCaseData> MalformedFiles()
    {
        yield return Case("empty_file", SafeTensorsError.HeaderTooSmall, null, path => File.WriteAllBytes(path, []));
        yield return Case("file_under_8_bytes", SafeTensorsError.HeaderTooSmall, null, path => File.WriteAllBytes(path, [16, 0, 0, 0, 0]));
        yield return Case("header_length_past_end", SafeTensorsError.InvalidHeaderLength, null,
            path => File.WriteAllBytes(path, WithHeaderLength(SafeTensorsWriter.Serialize("{}", []), 4096)));
        yield return Case("header_length_over_100MB_cap", SafeTensorsError.HeaderTooLarge, null,
            path => File.WriteAllBytes(path, WithHeaderLength(SafeTensorsWriter.Serialize("{}", []), 100_000_008)));
        yield return Case("header_length_u64_max", SafeTensorsError.HeaderTooLarge, null,
            path => File.WriteAllBytes(path, WithHeaderLength(SafeTensorsWriter.Serialize("{}", []), ulong.MaxValue)));
        yield return Case("header_length_zero", SafeTensorsError.InvalidHeaderJson, null,
            path => File.WriteAllBytes(path, new byte[8]));
        yield return Case("invalid_json", SafeTensorsError.InvalidHeaderJson, null,
            path => SafeTensorsWriter.WriteRaw(path, "{\"a\": {\"dtype\": \"F32\", \"shape\": [1], ", new byte[4]));
        yield return Case("invalid_utf8_in_header", SafeTensorsError.InvalidHeaderJson, null,
            path => File.WriteAllBytes(path, WithHeaderBytes("{\"a\xff\": " + ValidEntry + "}", new byte[4])));
        yield return Case("lone_surrogate_escape_in_tensor_name", SafeTensorsError.InvalidHeaderJson, null,
            path => SafeTensorsWriter.WriteRaw(path, "{\"a\\ud800\": " + ValidEntry + "}", new byte[4]));
        yield return Case("header_not_an_object", SafeTensorsError.InvalidHeaderJson, null,
            path => SafeTensorsWriter.WriteRaw(path, "[" + ValidEntry + "]", new byte[4]));
        yield return Case("header_json_null", SafeTensorsError.InvalidHeaderJson, null,
            path => SafeTensorsWriter.WriteRaw(path, "null", []));
        yield return Case("entry_not_an_object", SafeTensorsError.InvalidTensorEntry, "a",
            path => SafeTensorsWriter.WriteRaw(path, "{\"a\": 5}", []));
        yield return Case("missing_dtype", SafeTensorsError.InvalidTensorEntry, "a",
            path => SafeTensorsWriter.WriteRaw(path, "{\"a\": {\"shape\": [1], \"data_offsets\": [0, 4]}}", new byte[4]));
        yield return Case("unknown_dtype", SafeTensorsError.UnknownDType, "a",
            path => SafeTensorsWriter.WriteRaw(path, "{\"a\": {\"dtype\": \"Q4_0\", \"shape\": [1], \"data_offsets\": [0, 4]}}", new byte[4]));
        yield return Case("lowercase_dtype", SafeTensorsError.UnknownDType, "a",
            path => SafeTensorsWriter.WriteRaw(path, "{\"a\": {\"dtype\": \"f32\", \"shape\": [1], \"data_offsets\": [0, 4]}}", new byte[4]));
        yield return Case("missing_shape", SafeTensorsError.InvalidShape, "a",
            path => SafeTensorsWriter.WriteRaw(path, "{\"a\": {\"dtype\": \"F32\", \"data_offsets\": [0, 4]}}", new byte[4]));
        yield return Case("negative_shape", SafeTensorsError.InvalidShape, "a",
            path => SafeTensorsWriter.WriteRaw(path, "{\"a\": {\"dtype\": \"F32\", \"shape\": [-1], \"data_offsets\": [0, 4]}}", new byte[4]));
        yield return Case("non_integer_shape", SafeTensorsError.InvalidShape, "a",
            path => SafeTensorsWriter.WriteRaw(path, "{\"a\": {\"dtype\": \"F32\", \"shape\": [1.5], \"data_offsets\": [0, 4]}}", new byte[4]));
        yield return Case("string_shape", SafeTensorsError.InvalidShape, "a",
            path => SafeTensorsWriter.WriteRaw(path, "{\"a\": {\"dtype\": \"F32\", \"shape\": [\"1\"], \"data_offsets\": [0, 4]}}", new byte[4]));
        yield return Case("shape_element_count_overflows", SafeTensorsError.InvalidShape, "a",
            path => SafeTensorsWriter.WriteRaw(path,
                "{\"a\": {\"dtype\": \"F32\", \"shape\": [2147483647, 2147483647, 4], \"data_offsets\": [0, 4]}}", new byte[4]));
        yield return Case("missing_data_offsets", SafeTensorsError.InvalidOffsets, "a",
            path => SafeTensorsWriter.WriteRaw(path, "{\"a\": {\"dtype\": \"F32\", \"shape\": [1]}}", new byte[4]));
        yield return Case("data_offsets_end_before_begin", SafeTensorsError.InvalidOffsets, "a",
            path => SafeTensorsWriter.WriteRaw(path, "{\"a\": {\"dtype\": \"F32\", \"shape\": [0], \"data_offsets\": [4, 0]}}", new byte[4]));
        yield return Case("data_offsets_not_integers", SafeTensorsError.InvalidOffsets, "a",
            path => SafeTensorsWriter.WriteRaw(path, "{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4.5]}}", new byte[4]));
        yield return Case("data_offsets_strings", SafeTensorsError.InvalidOffsets, "a",
            path => SafeTensorsWriter.WriteRaw(path, "{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [\"0\", \"4\"]}}", new byte[4]));
        yield return Case("data_offsets_past_end_truncated_file", SafeTensorsError.InvalidOffsets, "second", WriteTruncated);
        yield return Case("shape_times_dtype_size_differs_from_byte_length", SafeTensorsError.ShapeSizeMismatch, "a",
            path => SafeTensorsWriter.Write(path, [("a", DType.F32, [3], new byte[8])]));
        yield return Case("overlapping_tensors", SafeTensorsError.OverlappingTensors, "b",
            path => SafeTensorsWriter.WriteRaw(path,
                "{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}, \"b\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [4, 12]}}",
                new byte[12]));
        yield return Case("gap_between_tensors", SafeTensorsError.InvalidOffsets, "b",
            path => SafeTensorsWriter.WriteRaw(path,
                "{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}, \"b\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [8, 12]}}",
                new byte[12]));
        yield return Case("trailing_bytes_not_covered_by_any_tensor", SafeTensorsError.IncompleteDataRegion, "b",
            path => SafeTensorsWriter.WriteRaw(path,
                SafeTensorsWriter.Header([("a", DType.F32, [1], new byte[4]), ("b", DType.F16, [2], new byte[4])]), new byte[8 + 4]));
        yield return Case("duplicate_tensor_name", SafeTensorsError.DuplicateTensor, "a",
            path => SafeTensorsWriter.WriteRaw(path,
                "{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}, \"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 8]}}",
                new byte[8]));
        yield return Case("metadata_value_not_a_string", SafeTensorsError.InvalidTensorEntry, "__metadata__",
            path => SafeTensorsWriter.WriteRaw(path, "{\"__metadata__\": {\"format\": 1}}", []));
    }

    private static TestCaseData Case(string name, SafeTensorsError kind, string? tensor, Action<string> write) =>
        new TestCaseData(write, kind, tensor).SetName($"safetensors_rejects({name})");

    [TestCaseSource(nameof(MalformedFiles))]
    public void Rejects(Action<string> write, SafeTensorsError kind, string? tensor)
    {
        string path = PathOf("model.safetensors");
        write(path);

        var error = Assert.Throws<SafeTensorsException>(() => SafeTensorsFile.Open(path).Dispose());
        AssertNames(error, kind, path, tensor);
        AssertNothingMapped();
        // A failed open must not pin the file: it can be replaced and deleted at once.
        SafeTensorsWriter.Write(path, [("a", DType.F32, [1], SafeTensorsWriter.EncodeF32([1f]))]);
        using (var replaced = SafeTensorsFile.Open(path))
        {
            Assert.That(replaced.GetTensor("a").GetFloat(0), Is.EqualTo(1f));
        }
        File.Delete(path);
        Assert.That(File.Exists(path), Is.False);
    }

    [Test]
    public void safetensors_failed_opens_leak_no_handles_or_mappings()
    {
        // Each kind fails after the file is mapped, so a missing release would leak one descriptor per open.
        string[] paths = [PathOf("overlap.safetensors"), PathOf("truncated.safetensors"), PathOf("mismatch.safetensors")];
        SafeTensorsWriter.WriteRaw(paths[0],
            "{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}, \"b\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [4, 12]}}",
            new byte[12]);
        WriteTruncated(paths[1]);
        SafeTensorsWriter.Write(paths[2], [("a", DType.F32, [3], new byte[8])]);

        int before = OpenHandleCount();
        for (int attempt = 0; attempt < 200; attempt++)
        {
            string path = paths[attempt % paths.Length];
            Assert.Throws<SafeTensorsException>(() => SafeTensorsFile.Open(path).Dispose());
        }
        int after = OpenHandleCount();

        Assert.That(after, Is.LessThanOrEqualTo(before + 5), "open handles before and after 200 failed opens");
        AssertNothingMapped();
        foreach (string path in paths)
        {
            File.Delete(path);
        }
        Assert.That(Directory.GetFiles(_directory), Is.Empty);
    }

    [Test]
    public void safetensors_maps_while_open_and_unmaps_on_dispose()
    {
        // Proves that AssertNothingMapped can see a mapping: without this, its passing would mean nothing.
        string path = PathOf("model.safetensors");
        SafeTensorsWriter.Write(path, [("a", DType.F32, [1], SafeTensorsWriter.EncodeF32([1f]))]);
        var file = SafeTensorsFile.Open(path);
        if (OperatingSystem.IsLinux())
        {
            Assert.That(File.ReadAllText("/proc/self/maps"), Does.Contain(Path.GetFileName(_directory)));
        }
        file.Dispose();
        file.Dispose();
        AssertNothingMapped();
        Assert.That(() => file.TryGetTensor("a", out _), Throws.TypeOf<ObjectDisposedException>());
    }

    [Test]
    public void safetensors_model_with_an_unsupported_dtype_is_refused_naming_the_tensor()
    {
        var spec = new SyntheticModelSpec();
        string model = SyntheticModel.Write(PathOf("model"), spec, tensors =>
        [
            .. tensors.Select(tensor => tensor.Name == "model.norm.weight"
                ? (tensor.Name, DType.I32, tensor.Shape, new byte[spec.HiddenSize * sizeof(int)])
                : tensor),
        ]);

        var error = Assert.Throws<SafeTensorsException>(() => LlamaModel.Load(model, new ModelLoadOptions { Threads = 1 }).Dispose());
        using (Assert.EnterMultipleScope())
        {
            Assert.That(error.Kind, Is.EqualTo(SafeTensorsError.UnsupportedDType));
            Assert.That(error.TensorName, Is.EqualTo("model.norm.weight"));
            Assert.That(error.Message, Does.Contain("'model.norm.weight'"));
            Assert.That(error.Message, Does.Contain("I32"));
        }
        AssertNothingMapped();
    }

    // ---------------------------------------------------------------- helpers

    /// <summary>An expected array, spelled inline; a params array keeps CA1861 quiet without a field per assertion.</summary>
    private static T[] Values<T>(params T[] values) => values;

    private static void AssertNames(SafeTensorsException error, SafeTensorsError kind, string path, string? tensor)
    {
        using (Assert.EnterMultipleScope())
        {
            Assert.That(error.Kind, Is.EqualTo(kind), error.Message);
            Assert.That(error.FilePath, Is.EqualTo(path));
            Assert.That(error.Message, Does.Contain(path));
            Assert.That(error.TensorName, Is.EqualTo(tensor), error.Message);
            if (tensor is not null)
            {
                Assert.That(error.Message, Does.Contain($"'{tensor}'"));
            }
        }
    }

    /// <summary>No file of this test's folder is still memory-mapped (Linux: /proc/self/maps lists every mapping).</summary>
    private void AssertNothingMapped()
    {
        if (OperatingSystem.IsLinux())
        {
            Assert.That(File.ReadAllText("/proc/self/maps"), Does.Not.Contain(Path.GetFileName(_directory)), "a file of the test folder is still mapped");
        }
    }

    private static int OpenHandleCount()
    {
        if (OperatingSystem.IsLinux())
        {
            return Directory.GetFileSystemEntries("/proc/self/fd").Length;
        }
        using var process = Process.GetCurrentProcess();
        return process.HandleCount;
    }

    private void WriteIndex(params (string Tensor, string File)[] entries)
    {
        var map = string.Join(", ", entries.Select(entry => $"\"{entry.Tensor}\": \"{entry.File}\""));
        File.WriteAllText(PathOf(SafeTensorsArchive.IndexFileName), "{\"metadata\": {\"total_size\": 0}, \"weight_map\": {" + map + "}}");
    }

    /// <summary>A valid two-tensor file cut short inside its last tensor, as an interrupted download leaves it.</summary>
    private static void WriteTruncated(string path)
    {
        SafeTensorsWriter.Write(path,
        [
            ("first", DType.F32, [4], SafeTensorsWriter.EncodeF32([1f, 2f, 3f, 4f])),
            ("second", DType.F32, [8], SafeTensorsWriter.EncodeF32([1f, 2f, 3f, 4f, 5f, 6f, 7f, 8f])),
        ]);
        using var stream = new FileStream(path, FileMode.Open, FileAccess.Write);
        stream.SetLength(stream.Length - 4);
    }

    private static byte[] WithHeaderLength(byte[] file, ulong headerLength)
    {
        BinaryPrimitives.WriteUInt64LittleEndian(file, headerLength);
        return file;
    }

    /// <summary>Like <see cref="SafeTensorsWriter.Serialize"/>, but chars up to U+00FF are written as the raw byte, so invalid UTF-8 can be stored.</summary>
    private static byte[] WithHeaderBytes(string header, byte[] data)
    {
        byte[] file = SafeTensorsWriter.Serialize(new string(' ', header.Length), data);
        Encoding.Latin1.GetBytes(header).CopyTo(file, 8);
        return file;
    }
}
